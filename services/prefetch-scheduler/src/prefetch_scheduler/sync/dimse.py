"""C-FIND at STUDY / SERIES / IMAGE level and C-MOVE at any level against a
remote node (blocking: callers run these in a thread)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs_common.sync.models import SyncFilter
from prefetch_scheduler.prefetch.dimse import (
    PENDING,
    SUCCESS,
    DimseTimeouts,
    MoveResult,
    OperationFailedError,
    Peer,
    RemotePacs,
    checked_responses,
)

__all__ = ["RemoteSeries", "RemoteStudy", "SyncScu"]


@dataclass(frozen=True)
class RemoteStudy:
    study_instance_uid: str
    patient_id: str | None
    study_date: str | None
    modalities: tuple[str, ...]
    instances: int | None


@dataclass(frozen=True)
class RemoteSeries:
    series_instance_uid: str
    modality: str | None
    instances: int | None


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


def _multi(value: object) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split("\\") if v)
    return tuple(str(v) for v in value if str(v))  # type: ignore[attr-defined]


class SyncScu(RemotePacs):
    """The Study Root Q/R SCU a sync run uses."""

    def __init__(self, calling_ae_title: str, timeouts: DimseTimeouts) -> None:
        super().__init__(calling_ae_title, timeouts)
        self._find_timeout = timeouts.find

    def find(self, peer: Peer, identifier: Dataset) -> list[Dataset]:
        context = StudyRootQueryRetrieveInformationModelFind
        assoc = self._associate(peer, context, self._find_timeout)
        found: list[Dataset] = []
        try:
            for status, response in checked_responses(assoc.send_c_find(identifier, context), peer, "C-FIND"):
                code = int(status.Status)
                if code in PENDING:
                    if response is not None:
                        found.append(response)
                elif code != SUCCESS:
                    raise OperationFailedError(f"C-FIND at {peer}: status 0x{code:04X}")
        finally:
            assoc.release()
        return found

    def studies(self, peer: Peer, where: SyncFilter) -> list[RemoteStudy]:
        """The remote's studies within the filter (one query per patient ID when it names some)."""
        found: dict[str, RemoteStudy] = {}
        for patient_id in where.patient_ids or ("",):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.PatientID = patient_id
            identifier.StudyInstanceUID = ""
            identifier.StudyDate = where.date_range()
            identifier.ModalitiesInStudy = ""
            identifier.NumberOfStudyRelatedInstances = ""
            for response in self.find(peer, identifier):
                uid = _text(response.get("StudyInstanceUID"))
                if uid is None:
                    continue
                study = RemoteStudy(
                    study_instance_uid=uid,
                    patient_id=_text(response.get("PatientID")),
                    study_date=_text(response.get("StudyDate")),
                    modalities=_multi(response.get("ModalitiesInStudy")),
                    instances=_int(response.get("NumberOfStudyRelatedInstances")),
                )
                if where.admits(study.modalities, study.study_date, study.patient_id):
                    found[uid] = study
        return list(found.values())

    def series(self, peer: Peer, study_instance_uid: str) -> list[RemoteSeries]:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study_instance_uid
        identifier.SeriesInstanceUID = ""
        identifier.Modality = ""
        identifier.NumberOfSeriesRelatedInstances = ""
        result = []
        for response in self.find(peer, identifier):
            uid = _text(response.get("SeriesInstanceUID"))
            if uid is not None:
                result.append(
                    RemoteSeries(
                        uid,
                        _text(response.get("Modality")),
                        _int(response.get("NumberOfSeriesRelatedInstances")),
                    )
                )
        return result

    def instances(self, peer: Peer, study_instance_uid: str, series_instance_uid: str) -> set[str]:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = study_instance_uid
        identifier.SeriesInstanceUID = series_instance_uid
        identifier.SOPInstanceUID = ""
        return {
            uid for r in self.find(peer, identifier) if (uid := _text(r.get("SOPInstanceUID"))) is not None
        }

    def move(
        self,
        peer: Peer,
        destination: str,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uids: Sequence[str] = (),
    ) -> MoveResult:
        """C-MOVE a study, a series or some instances of a series to ``destination``;
        the counts of the final response (a refused move raises)."""
        identifier = Dataset()
        identifier.StudyInstanceUID = study_instance_uid
        if series_instance_uid is None:
            identifier.QueryRetrieveLevel = "STUDY"
        else:
            identifier.SeriesInstanceUID = series_instance_uid
            identifier.QueryRetrieveLevel = "SERIES"
            if sop_instance_uids:
                identifier.QueryRetrieveLevel = "IMAGE"
                identifier.SOPInstanceUID = list(sop_instance_uids)
        final, result = self.send_move(peer, identifier, destination)
        code = int(final.Status)
        if code in (SUCCESS, 0xB000):
            return result
        if code == 0xA801:
            raise OperationFailedError(
                f"C-MOVE at {peer}: {peer.ae_title} does not know the destination {destination}"
            )
        raise OperationFailedError(f"C-MOVE at {peer} to {destination}: status 0x{code:04X}")
