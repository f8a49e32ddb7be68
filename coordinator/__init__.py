"""The coordinator: ``run`` plans a run and writes it to the store; ``controller`` drives the block
workers (``workers``: Ray actors or this process) under a failure ``policy``; ``tracking`` logs to
MLflow and registers the finished blocks; ``sampler`` loads a registered set back and evaluates it."""
