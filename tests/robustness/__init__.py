"""Robustness harness (issue 12): random traffic through a proxy while faults are injected,
every operation and watch response recorded as JSON lines, and validators that check the whole
recorded history against etcd's guarantees, using a direct whole-keyspace watch as ground truth.

* ``history``: the recorder (JSON lines) and the loader;
* ``model``: the keyspace replayed from the ground-truth watch;
* ``validators``: pure functions over a loaded history, each returning violations;
* ``traffic``, ``faults``, ``cluster``, ``harness``: the run itself;
* ``python -m tests.robustness``: long soak runs, and ``--check FILE`` to re-validate a recording.
"""
