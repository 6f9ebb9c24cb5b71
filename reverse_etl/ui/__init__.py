"""``reverse-etl ui``: a local, server-rendered page over the project file and the state store.

It shows what the CLI computes (``inspect``, ``controls``, ``plan``) and starts runs as the CLI
does, in a child process taking the same lock; it holds no state of its own.
"""
