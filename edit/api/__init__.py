"""The API floor: what a user calls, above the core and the methods.

``edits``: one edit of a model in memory as a transaction (``edit.apply``), and asking the
model (``edit.ask``); ``workspace``: the ``Workspace``, a model kept in step with its ledger
(``edit.ledger``). ``import edit`` names both; the evals and the CLI build on them.
"""
