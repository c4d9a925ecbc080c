"""Models on disk that mlxgate manages itself: pulled, created, copied, deleted.

``names`` checks the names callers give (data, never paths); ``store`` keeps
what a name means (an SQLite manifest per name) and owns every folder the
models live in, behind one name-to-path function.  The MLX registry lists the
store's models beside the folders a user placed by hand.
"""
