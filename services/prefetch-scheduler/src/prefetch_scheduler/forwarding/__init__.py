"""Routing / auto-forward: rules on ``instance.stored`` / ``study.stable``
events queue instances per destination AE (``forward_item``), and senders
deliver them over C-STORE with retries.  :func:`service.run_forwarder` is
the entry point the prefetch-scheduler process starts."""
