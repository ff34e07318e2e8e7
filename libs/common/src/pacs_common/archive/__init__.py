"""Reading from archive tiers: restores of archived objects and last access.

* :mod:`.settings`: ``PACS_RESTORE_*`` and ``PACS_ACCESS_*``;
* :mod:`.requests`: a reader that finds an object archived (or the index
  says NEARLINE) asks for a restore: one live ``restore`` job per instance,
  the instance marked NEARLINE;
* :mod:`.restore`: :class:`~pacs_common.archive.restore.RestoreProcessor`
  works those jobs off (S3 restore / Azure rehydrate, then ONLINE once the
  object reads again); the hsm-migrator runs it;
* :mod:`.access`: last access of instances and studies, coalesced in memory
  and written in the background (never a round-trip per read);
* :mod:`.metrics`: the restore counters.

Nothing here is imported by this ``__init__``: a service imports the module
it uses.
"""
