"""Data loading: files (JSONL, Parquet, Hugging Face datasets saved to disk) into validated records.

Rows are validated once, here; a bad row raises ``mmalign.errors.DataError`` naming file, row and field.
``loaders`` reads files, ``records`` turns one row dict into a ``Sample``, ``media`` checks images.
"""
