"""mkdocs-gen-files script: writes the settings pages from compeff's pydantic models at build time."""

import mkdocs_gen_files

from compeff.settings_doc import settings_pages

for path, text in settings_pages().items():
    with mkdocs_gen_files.open(path, "w") as fh:
        fh.write(text)
