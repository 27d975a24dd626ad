"""Repository tooling, not part of the installed ``titans_mini`` package.

* ``python -m tools.notebook_setup`` — rewrite every notebook's title badge and shared set-up cell
* ``python -m tools.exercise_gen`` — generate ``exercises/`` from ``solutions/``

``make exercises`` runs both.
"""
