"""`dpe experiment`: quota strategies (arms) compared over seeds on one held-out suite.

``runner`` runs the arms and writes the results; ``statistics`` recomputes every figure from the
tidy table of runs the runner writes.
"""
