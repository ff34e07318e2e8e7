"""C-ECHO with DCMTK's echoscu, and the called AE title policy."""

from pacs_common.localrun.runner import LocalSystem
from pacs_e2e.dcmtk import echoscu


def test_echoscu_succeeds(pacs: LocalSystem) -> None:
    result = echoscu(pacs.gateway_port, called=pacs.ae_title)
    assert result.returncode == 0, result.output


def test_wrong_called_ae_title_is_rejected(pacs: LocalSystem) -> None:
    result = echoscu(pacs.gateway_port, called="NOT-THE-PACS")
    assert result.returncode != 0
    assert "called ae title not recogni" in result.output.lower(), result.output
