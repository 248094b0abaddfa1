"""The composition root: what wires DenseAlign's rooms together.

`core` is the library (schema and queries, the diffusion maths, settings, storage, the queue);
`app` (web), `worker` (sampling) and `trainer` (rounds) each build on `core` alone and never on one
another. What needs more than one room lives here: the `densealign` command (`cli`), the one-machine
demo that runs app, worker and trainer together (`demo`), and the programmatic labeller that drives
the REST API (`labeller`). Nothing imports this package but tests, experiments and benchmarks; the
import rules are enforced by tests/test_import_rules.py.
"""
