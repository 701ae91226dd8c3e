"""``python -m tasks.params [path]``: validate a params file and print its cells."""

from tasks.params.document import main

main()
