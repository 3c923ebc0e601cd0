"""Built-in stages, one module per family: ``db``, ``http``, ``image``, ``files``.

Each uses exactly the stage contract of :mod:`pipeline` that a user's custom stage uses;
none reaches into the engine.
"""
