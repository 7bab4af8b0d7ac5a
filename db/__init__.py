"""The catalog database: models, engines and sessions, catalog writes and schema migrations.

Import the submodules (``db.catalog``, ``db.session``, ``db.migrate``, ``db.models``) where they are needed:
this package imports nothing itself, so ``import db`` stays cheap.
"""
