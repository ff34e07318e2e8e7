"""AI rules and inference requests (``ai_rule``, ``ai_request``; migration 0012).

The REST API edits the rules and lists the requests; the ai-connector
matches rules against stable studies and runs the requests.
"""

from pacs_common.ai.models import (
    AiRequest,
    AiRequestState,
    AiRule,
    AiRuleCreate,
    SeriesFacts,
)
from pacs_common.ai.repository import AiRequestRepository, AiRuleExistsError, AiRuleRepository

__all__ = [
    "AiRequest",
    "AiRequestRepository",
    "AiRequestState",
    "AiRule",
    "AiRuleCreate",
    "AiRuleExistsError",
    "AiRuleRepository",
    "SeriesFacts",
]
