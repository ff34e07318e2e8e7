"""Prior-study prefetch: when a procedure is scheduled (a worklist item is
created or becomes due) or on demand, find the patient's prior studies at
the remote PACS (C-FIND), choose the relevant ones, and have them sent to
our gateway (C-MOVE) before anybody needs them.

Every request is a ``prefetch`` job (``pacs_common.jobs``); replicas take
jobs with ``FOR UPDATE SKIP LOCKED`` and coordinate everything else through
PostgreSQL (see :mod:`.repository` and :mod:`.throttle`)."""
