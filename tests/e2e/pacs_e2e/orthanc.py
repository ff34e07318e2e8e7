"""Orthanc (Debian's package) as a real peer: a C-MOVE destination in the
tests, a comparison point in the benchmark."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from pacs_common.localrun.infra import find_free_port
from pacs_e2e.dcmtk import DCMTK_ENV, echoscu


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")


class OrthancServer:
    """An Orthanc process with its own storage under ``workdir``.

    ``modalities`` maps an AE title Orthanc may send to (C-MOVE destination,
    C-STORE target) to ``(host, port)``.
    """

    def __init__(
        self, workdir: Path, *, aet: str = "ORTHANC", modalities: dict[str, tuple[str, int]] | None = None
    ) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError("Orthanc is not installed (apt package orthanc)")
        self.binary = binary
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = find_free_port()
        self.http_port = find_free_port()
        self.modalities = dict(modalities or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30)

    def config(self) -> dict[str, Any]:
        return {
            "Name": "e2e",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {aet: [aet, host, port] for aet, (host, port) in self.modalities.items()},
            "Plugins": [],
        }

    def __enter__(self) -> OrthancServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config()))
        log = (self.workdir / "orthanc.log").open("wb")
        self._proc = subprocess.Popen(
            [self.binary, str(config_path)], env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 30
        while echoscu(self.dicom_port, called=self.aet).returncode != 0:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"Orthanc did not start; see {self.workdir / 'orthanc.log'}")
            time.sleep(0.2)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._http.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)

    def get(self, path: str) -> Any:
        response = self._http.get(path)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        response = self._http.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def upload(self, path: Path) -> None:
        response = self._http.post("/instances", content=path.read_bytes())
        response.raise_for_status()

    def sop_instance_uids(self) -> set[str]:
        """Every SOP Instance UID Orthanc holds, from its REST API."""
        uids: set[str] = set()
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            uids.add(tags["SOPInstanceUID"])
        return uids
