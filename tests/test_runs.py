"""Run folders: batch appends, torn-line repair, resume, conflicts, --force."""

from __future__ import annotations

import json

import pytest

from compeff.runs import Stage, StageConflict, iter_jsonl, read_manifest


def test_append_resume_and_manifest(tmp_path):
    with Stage.open(tmp_path, "s", config={"a": 1}) as st:
        assert st.done_ids == set()
        st.append([{"id": "1", "v": 1}, {"id": "2", "v": 2}])
        st.fail([{"id": "3", "reason": "boom"}])
    manifest = read_manifest(tmp_path / "s")
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"ok": 2, "failed": 1, "resumed_from": 0}
    assert "torch" in manifest["versions"] and manifest["fingerprint"]

    st = Stage.open(tmp_path, "s", config={"a": 1})
    assert st.done_ids == {"1", "2"} and st.was_complete
    assert st.append([{"id": "2", "v": 99}, {"id": "3", "v": 3}]) == 1  # finished ids never written twice
    st.close()
    assert [r["id"] for r in iter_jsonl(tmp_path / "s" / "data.jsonl")] == ["1", "2", "3"]


def test_torn_last_line_is_cut_on_resume(tmp_path):
    st = Stage.open(tmp_path, "s", config={})
    st.append([{"id": "1"}, {"id": "2"}])
    st.close(complete=False)
    with (tmp_path / "s" / "data.jsonl").open("a") as fh:
        fh.write('{"id": "3", "text": "half a rec')  # what a kill mid-write leaves
    st = Stage.open(tmp_path, "s", config={})
    assert st.done_ids == {"1", "2"} and not st.was_complete
    st.append([{"id": "3", "text": "whole"}])
    st.close()
    rows = list(iter_jsonl(tmp_path / "s" / "data.jsonl"))
    assert rows[-1] == {"id": "3", "text": "whole"} and len(rows) == 3


def test_changed_config_or_input_conflicts_until_forced(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("one")
    Stage.open(tmp_path, "s", config={"ratio": 0.5}, inputs={"texts": source}).close()
    with pytest.raises(StageConflict, match="ratio"):
        Stage.open(tmp_path, "s", config={"ratio": 0.3}, inputs={"texts": source})
    source.write_text("two")
    with pytest.raises(StageConflict, match="texts"):
        Stage.open(tmp_path, "s", config={"ratio": 0.5}, inputs={"texts": source})
    st = Stage.open(tmp_path, "s", config={"ratio": 0.3}, inputs={"texts": source}, force=True)
    assert st.done_ids == set()
    st.close()


def test_records_need_ids_and_failures_need_reasons(tmp_path):
    st = Stage.open(tmp_path, "s", config={})
    with pytest.raises(ValueError, match="id"):
        st.append([{"text": "no id"}])
    with pytest.raises(ValueError, match="reason"):
        st.fail([{"id": "1"}])
    st.close()


def test_data_loads_with_datasets(tmp_path):
    from datasets import load_dataset

    with Stage.open(tmp_path, "s", config={}) as st:
        st.append([{"id": str(i), "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(5)])
    ds = load_dataset("json", data_files=str(tmp_path / "s" / "data.jsonl"), split="train")
    assert len(ds) == 5 and ds[0]["messages"][0]["content"] == "q0"
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["stage"] == "s"


def test_a_models_identity_is_its_weights_not_compeffs_card(tmp_path):
    from compeff.fingerprints import weights_fingerprint

    model = tmp_path / "healed"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 2}')
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    (model / "compeff_healed.json").write_text('{"seconds": 12.5, "device": "cpu"}')
    first = weights_fingerprint(model)
    (model / "compeff_healed.json").write_text('{"seconds": 99.0, "device": "cuda:0"}')  # rebuilt elsewhere
    assert weights_fingerprint(model) == first
    (model / "model.safetensors").write_bytes(b"\x01" * 64)
    assert weights_fingerprint(model) != first
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    (model / "config.json").write_text('{"num_hidden_layers": 3}')
    assert weights_fingerprint(model) != first
