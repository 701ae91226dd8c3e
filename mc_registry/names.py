"""How registered compressors are named and addressed.

- A registered model per cell (arch, rate), named by a template (params.yaml
  ``register.name_template``, default :data:`NAME_TEMPLATE`): ``metacompress-tiny-llava-r0.9``.
- The rate is written as DVC's matrix writes it (:func:`format_rate`): the same string names the
  cell's stages, folders and reports (``tasks.cells``), so a registered name matches its cell.
- A version is addressed by ``models:/<name>@<alias>`` (alias :data:`CHAMPION`: the version the
  registry promotes) or ``models:/<name>/<version>``.
"""

from __future__ import annotations

import re

__all__ = [
    "CHAMPION",
    "NAME_TEMPLATE",
    "check_template",
    "format_rate",
    "model_name",
    "model_uri",
    "parse_uri",
]

CHAMPION = "champion"
NAME_TEMPLATE = "{method}-{arch}-r{rate}"
_URI = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))")


def format_rate(rate: float | str) -> str:
    """The rate as it appears in names and paths (``0.5`` -> ``"0.5"``), like DVC's matrix."""
    return repr(float(rate))


def check_template(template: str) -> str:
    """``template`` if it names both the arch and the rate (two cells must not share a name)."""
    if "{arch}" not in template or "{rate}" not in template:
        raise ValueError(f"{template!r} must contain {{arch}} and {{rate}}")
    return template


def model_name(
    arch: str, rate: float | str, method: str = "metacompress", template: str = NAME_TEMPLATE
) -> str:
    """The registered model name of cell (arch, rate), e.g. ``metacompress-tiny-llava-r0.9``.

    ``template`` may use ``{method}`` (the trained method), and uses ``{arch}`` and ``{rate}``.
    """
    return template.format(method=method, arch=arch, rate=format_rate(rate))


def model_uri(name: str, *, alias: str | None = CHAMPION, version: str | int | None = None) -> str:
    """``models:/<name>@<alias>``, or ``models:/<name>/<version>`` when ``version`` is given."""
    return f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}"


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>@<alias>`` -> (name, alias, None); ``models:/<name>/<n>`` -> (name, None,
    n). ValueError naming the URI otherwise."""
    m = _URI.fullmatch(uri)
    if not m:
        raise ValueError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<n>")
    name, alias, version = m.groups()
    return name, alias, version
