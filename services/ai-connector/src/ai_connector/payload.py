"""Building the inference request of a claimed AI request from the index."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

import asyncpg

from ai_connector.contract import Auth, Callback, DicomwebLocation, InferenceRequest, InstanceRef, SeriesRef
from ai_connector.request_store import ClaimedRequest

__all__ = ["build_request", "callback_url", "dicomweb_root"]


def dicomweb_root(dicomweb_url: str) -> str:
    return f"{dicomweb_url.rstrip('/')}/dicom-web"


def callback_url(public_url: str, job_id: str) -> str:
    return f"{public_url.rstrip('/')}/v1/ai/jobs/{quote(job_id, safe='')}/results"


async def build_request(
    db: asyncpg.Pool | asyncpg.Connection,
    request: ClaimedRequest,
    *,
    dicomweb_url: str,
    dicomweb_token: str | None,
    public_url: str | None,
) -> InferenceRequest:
    """The request JSON: the matched series with their instances and URLs."""
    rows = await db.fetch(
        """
        SELECT se.series_instance_uid, se.modality, se.body_part_examined, i.sop_class_uid, i.sop_instance_uid,
               p.patient_id
        FROM study st
        JOIN patient p ON p.pk = st.patient_fk
        JOIN series se ON se.study_fk = st.pk
        JOIN instance i ON i.series_fk = se.pk
        WHERE st.study_instance_uid = $1 AND se.series_instance_uid = ANY($2::text[])
        ORDER BY se.series_number NULLS LAST, se.pk, i.instance_number NULLS LAST, i.pk
        """,
        request.study_instance_uid,
        request.series_instance_uids,
    )
    base = dicomweb_root(dicomweb_url)
    study_url = f"{base}/studies/{request.study_instance_uid}"
    series: dict[str, SeriesRef] = {}
    instances: dict[str, list[InstanceRef]] = {}
    attributes: dict[str, Mapping[str, str | None]] = {}
    for row in rows:
        uid = row["series_instance_uid"]
        attributes.setdefault(uid, {"modality": row["modality"], "body_part": row["body_part_examined"]})
        instances.setdefault(uid, []).append(
            InstanceRef(
                sop_class_uid=row["sop_class_uid"],
                sop_instance_uid=row["sop_instance_uid"],
                instance_url=f"{study_url}/series/{uid}/instances/{row['sop_instance_uid']}",
            )
        )
    for uid, refs in instances.items():
        series[uid] = SeriesRef(
            series_instance_uid=uid,
            modality=attributes[uid]["modality"],
            body_part_examined=attributes[uid]["body_part"],
            series_url=f"{study_url}/series/{uid}",
            instances=refs,
        )
    job_id = request.public_job_id
    return InferenceRequest(
        job_id=job_id,
        rule=request.rule.name,
        study_instance_uid=request.study_instance_uid,
        patient_id=rows[0]["patient_id"] if rows else None,
        series=list(series.values()),
        dicomweb=DicomwebLocation(base_url=base, study_url=study_url),
        auth=None if dicomweb_token is None else Auth(token=dicomweb_token),
        callback=None
        if public_url is None
        else Callback(url=callback_url(public_url, job_id), token=request.callback_token),
    )
