"""The end-to-end bench: workloads of real text replayed against real SGLang servers,
one per policy, and the report that compares them (``bench/run.py``)."""
