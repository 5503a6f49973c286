"""What leaves a site when its data is bad (client/app.py handle_train): a record that cannot
be used is left out and logged on the site only; an error that makes the site refuse leaves
it as one fixed text (common.reasons), with no file name, path, exception text or chained
error, and is logged in full on the site."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import handle_train, refusal_reason, require_images
from client.policy import PolicyError
from client.secagg import SecAggProtocolError
from common import keys
from common.config import RunConfig
from common.data import SiteDataError, SiteImages, load_site_images
from common.paths import REPO_ROOT
from common.reasons import SITE_DATA, SITE_INTERNAL, SITE_POLICY, SITE_PROTOCOL, SITE_REFUSALS, SiteRefusal

DEMO = REPO_ROOT / "data/demo/site-0"
PRIVATE = "patient-0042-scan.png"


def dpagg_round(cfg: RunConfig, folder) -> tuple[Message, Context]:
    """A DPAgg-TI train message and the site's context (no policy) reading ``folder``."""
    msg = Message(content=RecordDict({keys.CONFIG: ConfigRecord({keys.ROUND: 1, keys.METHOD: "dpagg"})}),
                  dst_node_id=1, message_type="train")
    node = {"partition-id": 0, "data-path": str(folder), "site-name": "clinic-a"}
    return msg, Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())


@pytest.mark.parametrize("err,reason", [
    (SiteDataError("clinic-a", f"/data/{PRIVATE}", "data folder does not exist"), SITE_DATA),
    (PolicyError("clinic-a: refused by the site's privacy policy: epsilon 0.9 > 0.5"), SITE_POLICY),
    (SecAggProtocolError("two sites were given the same public key"), SITE_PROTOCOL),
    (RuntimeError(f"CUDA out of memory while reading {PRIVATE}"), SITE_INTERNAL),
    (ValueError("site 'clinic-a' has no image to train on"), SITE_INTERNAL),
])
def test_every_error_maps_to_one_fixed_text(err, reason):
    assert refusal_reason(err) == reason
    assert str(SiteRefusal(reason)) == reason and PRIVATE not in reason


def test_a_refusal_carries_only_a_text_of_the_vocabulary():
    with pytest.raises(ValueError, match="must be one of"):
        SiteRefusal(f"site refused: {PRIVATE} is truncated")
    assert len(set(SITE_REFUSALS)) == 4 and all(text.startswith("site refused the round: ") for text in SITE_REFUSALS)


def test_local_training_needs_an_image_dpagg_does_not():
    empty = SiteImages(names=(), pixels=torch.zeros(0, 3, 8, 8), captions=(), site="clinic-a")
    with pytest.raises(SiteDataError, match="no usable image"):
        require_images(empty, "/data/clinic-a")
    full = load_site_images(DEMO, site="clinic-a", resolution=8, max_images=1)
    assert require_images(full, str(DEMO)) is full


def test_a_missing_data_folder_is_refused_with_the_fixed_text_and_logged_in_full(task_identity, tiny_sd_path,
                                                                                tmp_path, caplog):
    cfg = RunConfig.from_run_config({"model-path": str(tiny_sd_path), "ti-steps": 1})
    gone = tmp_path / "private-folder-of-clinic-a"
    msg, context = dpagg_round(cfg, gone)
    with caplog.at_level(logging.ERROR, logger="privadapt.client"), pytest.raises(SiteRefusal) as refused:
        handle_train(msg, context)
    assert str(refused.value) == SITE_DATA and refused.value.args == (SITE_DATA,)
    # nothing of the original error travels with the refusal (Flower formats the whole chain)
    assert refused.value.__context__ is None and refused.value.__cause__ is None
    assert "private-folder-of-clinic-a" in caplog.text and "does not exist" in caplog.text  # the site's own log


def test_a_site_with_a_bad_record_answers_and_logs_it_only_locally(task_identity, tiny_sd_path, tmp_path, caplog):
    folder = tmp_path / "site"
    shutil.copytree(DEMO, folder)
    first = sorted(folder.glob("*.png"))[0]
    (folder / PRIVATE).write_bytes(first.read_bytes()[:200])  # truncated
    cfg = RunConfig.from_run_config({"model-path": str(tiny_sd_path), "ti-steps": 1})
    msg, context = dpagg_round(cfg, folder)
    with caplog.at_level(logging.WARNING, logger="privadapt.client"):
        reply = handle_train(msg, context)
    assert not reply.has_error() and list(reply.content.keys()) == [keys.ARRAYS]
    assert list(reply.content[keys.ARRAYS].keys()) == [keys.EMBEDDING_SUM]
    left_out = [r for r in caplog.records if r.name == "privadapt.client" and PRIVATE in r.getMessage()]
    assert len(left_out) == 1 and "left out" in left_out[0].getMessage()
