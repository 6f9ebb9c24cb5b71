"""Small helpers the pipeline stages share: DuckDB scratch cursors (``scratch``), read-ahead
(``prefetch``), process memory settings (``runtime``) and local or ``s3://`` files
(``storage``)."""
