"""The query-service's HTTP contract: request/response models and clients.

The query-service owns DICOM matching (PS3.4 C.2.2.2) over the index; the
dimse-gateway (C-FIND, MWL, C-MOVE/C-GET instance lists) and the
dicomweb-api (QIDO-RS, WADO-RS) reach it through these clients.
"""

from pacs_common.query.client import (
    AsyncQueryClient,
    InvalidQueryError,
    QueryClient,
    QueryServiceError,
    QueryStream,
    QueryUnavailableError,
)
from pacs_common.query.models import (
    InformationModel,
    QueryCompletion,
    QueryLevel,
    QueryRequest,
    RetrievableInstance,
    RetrieveRequest,
    WorklistQueryRequest,
)

__all__ = [
    "AsyncQueryClient",
    "InformationModel",
    "InvalidQueryError",
    "QueryClient",
    "QueryCompletion",
    "QueryLevel",
    "QueryRequest",
    "QueryServiceError",
    "QueryStream",
    "QueryUnavailableError",
    "RetrievableInstance",
    "RetrieveRequest",
    "WorklistQueryRequest",
]
