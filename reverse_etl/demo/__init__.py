"""A deterministic demo warehouse (DuckDB) with the dirt real customer data carries."""
