"""The prefetch-scheduler: prior-study prefetch from remote PACS and scheduled maintenance tasks."""
