"""How registered compressors are named and addressed.

- A registered model per cell (arch, rate), named by a template (params.yaml
  ``register.name_template``, default :data:`NAME_TEMPLATE`): ``metacompress-tiny-llava-r0.9``.
- The rate is written as DVC's matrix writes it (:func:`format_rate`): the same string names the
  cell's stages, folders and reports (``tasks.cells``), so a registered name matches its cell.
- An any-rate compressor (one per arch, serving a span of rates) is named without a rate:
  :data:`ANY_NAME_TEMPLATE`, ``metacompress-tiny-llava-any``.
- A version is addressed by ``models:/<name>@<alias>`` (alias :data:`CHAMPION`: the version the
  registry promotes) or ``models:/<name>/<version>``.
"""

from __future__ import annotations

import re

__all__ = [
    "ANY_NAME_TEMPLATE",
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
ANY_NAME_TEMPLATE = "{method}-{arch}-any"
_URI = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))")


ANY = "any"


def format_rate(rate: float | str) -> str:
    """The rate as it appears in names and paths (``0.5`` -> ``"0.5"``), like DVC's matrix;
    :data:`ANY` (an any-rate compressor's) stays ``"any"``."""
    return ANY if rate == ANY else repr(float(rate))


def check_template(template: str, *, rate: bool = True) -> str:
    """``template`` if it names the arch and (``rate``) the rate: two cells must not share a
    name. An any-rate compressor's template (``rate`` False) names the arch only."""
    need = ["{arch}", "{rate}"] if rate else ["{arch}"]
    if any(k not in template for k in need):
        raise ValueError(f"{template!r} must contain {' and '.join(need)}")
    if not rate and "{rate}" in template:
        raise ValueError(f"{template!r}: an any-rate compressor has no one rate to name")
    try:
        template.format(method="m", arch="a", rate="0.5")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{template!r}: not a name template ({err!r})") from None
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
