"""``python -m schemas``: the table of every variable in a run (Markdown)."""

from schemas.run import schema_table

print(schema_table())
