"""The `weights` package: finding, converting, verifying and loading checkpoints, all offline.

The small golden model (random weights of the reference, see the golden README) is laid out the way the
official checkpoints are published: a hub cache with motion_autoencoder.pth / flow_transformer.pth from the
mirror repo and an HF-style wav2vec2 checkpoint (`wav2vec2.*` keys, old weight_g / weight_v names, a CTC
head), and must come back bit-identical through `load_model`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from avatar_forcing.errors import WeightsError
from avatar_forcing.model.avatar_forcing import build_model
from avatar_forcing.model.config import from_golden_dir, official
from avatar_forcing.weights import convert, hub, loading, verify
from avatar_forcing.weights.cli import add_weights_command
from avatar_forcing.weights.registry import CHECKPOINTS, MIRROR_REPO, WAV2VEC2_REPO

REPO_ROOT = Path(__file__).resolve().parents[1]
_golden_env = os.environ.get("AVATAR_FORCING_GOLDEN", "").split(os.pathsep)[0]
GOLDEN = Path(_golden_env) if _golden_env else REPO_ROOT.parent / "shared" / "golden" / "avatar_forcing_ref_v1"

pytestmark = pytest.mark.skipif(not (GOLDEN / "small_weights.safetensors").is_file(),
                                reason=f"golden reference folder not found at {GOLDEN} (set AVATAR_FORCING_GOLDEN)")

W2V = "audio_encoder.wav2vec2."
POS_CONV = "encoder.pos_conv_embed.conv."


# -- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Nothing may touch the real home or cache, or reach the network."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("HUGGINGFACE_HUB_CACHE", "AVATAR_FORCING_WEIGHTS", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def cfg():
    return from_golden_dir(GOLDEN)


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN / "small_weights.safetensors"))


@pytest.fixture(scope="module")
def official_parts(golden):
    """The golden state dict split the way the official files are."""
    motion = {k: v for k, v in golden.items()
              if k.startswith("motion_autoencoder.") and not k.endswith(".kernel")}  # no buffers, as released
    flow = {k: v for k, v in golden.items()
            if k.startswith(("flow_transformer.", "audio_encoder.audio_projection."))}  # masks kept: checked
    w2v = {}
    for k, v in golden.items():
        if k.startswith(W2V):
            rest = k[len(W2V):]
            rest = rest.replace(POS_CONV + "parametrizations.weight.original0", POS_CONV + "weight_g")
            rest = rest.replace(POS_CONV + "parametrizations.weight.original1", POS_CONV + "weight_v")
            w2v["wav2vec2." + rest] = v
    hidden = golden[W2V + "encoder.layer_norm.weight"].shape[0]
    w2v["lm_head.weight"] = torch.zeros(32, hidden)
    w2v["lm_head.bias"] = torch.zeros(32)
    return {"motion": motion, "flow": flow, "w2v": w2v}


@pytest.fixture(scope="module")
def w2v_config_json():
    raw = json.loads((GOLDEN / "small_config.json").read_text())["audio_encoder"]["wav2vec2_config_to_dict"]
    return json.dumps({**raw, "architectures": ["Wav2Vec2ForCTC"], "model_type": "wav2vec2"}).encode()


def torch_bytes(state_dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def official_files(parts, config_json, *, w2v_format="safetensors") -> dict[str, bytes]:
    files = {
        "motion_autoencoder.pth": torch_bytes(parts["motion"]),
        "flow_transformer.pth": torch_bytes(parts["flow"]),
        "wav2vec2-base-960h/config.json": config_json,
    }
    if w2v_format == "safetensors":
        files["wav2vec2-base-960h/model.safetensors"] = save(parts["w2v"])
    else:
        files["wav2vec2-base-960h/pytorch_model.bin"] = torch_bytes(parts["w2v"])
    return files


def write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_hub_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The hub cache layout: blobs by content hash, snapshot symlinks, refs/main -> commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def write_hub_cache(cache: Path, files: dict[str, bytes]) -> Path:
    mirror = {k: v for k, v in files.items() if "/" not in k}
    w2v = {k.split("/", 1)[1]: v for k, v in files.items() if "/" in k}
    write_hub_repo(cache, MIRROR_REPO, mirror)
    write_hub_repo(cache, WAV2VEC2_REPO, w2v)
    return cache


@pytest.fixture
def layout(official_parts, w2v_config_json):
    return official_files(official_parts, w2v_config_json)


@pytest.fixture
def local_dir(tmp_path, layout):
    return write_dir(tmp_path / "pretrained_dir", layout)


@pytest.fixture
def hub_cache(tmp_path, layout, monkeypatch):
    cache = write_hub_cache(tmp_path / "hf-cache", layout)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def no_arch(cfg):
    """The official config leaves the wav2vec2 architecture to the checkpoint's config.json."""
    return dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, wav2vec2={}))


def assert_matches_golden(model, golden):
    state = model.state_dict()
    assert set(state) == set(golden)
    for name, value in golden.items():
        assert torch.equal(state[name], value), name


def weights_cli(argv):
    parser = argparse.ArgumentParser(prog="avatar-forcing")
    add_weights_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["weights", *argv])
    return args.func(args)


# -- loading ------------------------------------------------------------------------------------------------


def test_load_model_from_hub_cache_offline(hub_cache, cfg, golden):
    model = loading.load_model(no_arch(cfg), None)
    # The backbone architecture came from the cached config.json (the small one, not the default base).
    assert model.audio_encoder.wav2vec2.config.hidden_size == 32
    assert_matches_golden(model, golden)

    direct = build_model(cfg)
    direct.load_state_dict(golden, strict=True)
    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.audio_encoder(wave, 25), direct.audio_encoder(wave, 25))
        t = torch.full((1, 50), 500.0)
        got_all, want_all = model.flow_transformer.time_modulation(t), direct.flow_transformer.time_modulation(t)
        for got, want in zip(got_all, want_all, strict=True):
            assert torch.equal(got, want)


def test_load_model_from_local_dir_via_env(local_dir, cfg, golden, monkeypatch):
    monkeypatch.setenv("AVATAR_FORCING_WEIGHTS", str(local_dir))
    assert_matches_golden(loading.load_model(no_arch(cfg), None), golden)


def test_load_model_with_pytorch_model_bin(tmp_path, official_parts, w2v_config_json, cfg, golden):
    directory = write_dir(tmp_path / "d", official_files(official_parts, w2v_config_json, w2v_format="bin"))
    assert_matches_golden(loading.load_model(cfg, directory), golden)


def test_load_model_single_full_file(cfg, golden):
    assert_matches_golden(loading.load_model(cfg, GOLDEN / "small_weights.safetensors"), golden)


def test_report_names_rebuilt_and_ignored(hub_cache, cfg):
    files = hub.resolve_official_files("hub", offline=True)
    assert files.wav2vec2.name == "model.safetensors" and files.wav2vec2_config is not None
    ignored: list[str] = []
    state_dict = loading.official_state_dict(files, ignored=ignored)
    assert W2V + POS_CONV + "parametrizations.weight.original0" in state_dict
    report = loading.load_into(build_model(cfg), state_dict, ignored=ignored)
    assert report.ok
    assert sorted(i.split(":")[1] for i in report.ignored) == ["lm_head.bias", "lm_head.weight"]
    assert report.rebuilt and all(n.endswith(".kernel") for n in report.rebuilt)  # .pth lacked them
    assert "flow_transformer.alignment_mask" in report.loaded  # present, and equal to the rebuilt value


def test_wav2vec2_key_mapping():
    m = loading.map_wav2vec2_key
    assert m("wav2vec2.encoder.pos_conv_embed.conv.weight_g") == W2V + POS_CONV + "parametrizations.weight.original0"
    assert m("wav2vec2.encoder.pos_conv_embed.conv.weight_v") == W2V + POS_CONV + "parametrizations.weight.original1"
    assert m("encoder.layers.0.attention.q_proj.weight") == W2V + "encoder.layers.0.attention.q_proj.weight"
    assert m(W2V + "masked_spec_embed") == W2V + "masked_spec_embed"
    assert m("lm_head.weight") is None
    assert m("quantizer.codevectors") == W2V + "quantizer.codevectors"  # kept, so reported as unexpected


def test_full_official_key_list_on_meta():
    """The released 575-entry state dict fits the official config, with or without its derived buffers."""
    model = build_model(official(), "meta")
    entries = {}
    for line in (GOLDEN / "full_model_keys.tsv").read_text().splitlines()[1:]:
        kind, name, shape, dtype, _numel, in_sd = line.split("\t")
        if in_sd == "yes":
            entries[name] = torch.empty(json.loads(shape), dtype=getattr(torch, dtype), device="meta")
    assert len(entries) == 575
    report = loading.load_into(model, entries)
    assert report.ok and len(report.loaded) == 575 and not report.rebuilt
    params_only = {k: v for k, v in entries.items() if not loading.is_derived_buffer(k)}
    report = loading.check_state_dict(model, params_only)
    assert report.ok and len(report.rebuilt) == 37


def test_hub_style_wav2vec2_config_builds_the_base_architecture(tmp_path):
    """A config.json as published for wav2vec2-base-960h (legacy fields included) gives the 9216-wide projection."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "architectures": ["Wav2Vec2ForCTC"], "model_type": "wav2vec2", "transformers_version": "4.4.0.dev0",
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "conv_bias": False, "feat_extract_norm": "group", "do_stable_layer_norm": False,
        "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16, "vocab_size": 32,
        "gradient_checkpointing": False, "feat_extract_dropout": 0.0, "hidden_dropout_prob": 0.1}))
    model = build_model(loading.resolve_config(official(), path), "meta")
    assert model.audio_encoder.audio_projection[0].weight.shape == (512, 9216)


# -- failures: each a WeightsError that says what and where -------------------------------------------------


def _broken_dir(tmp_path, official_parts, w2v_config_json, *, motion=None, flow=None, raw=None):
    parts = dict(official_parts)
    if motion is not None:
        parts["motion"] = motion
    if flow is not None:
        parts["flow"] = flow
    files = official_files(parts, w2v_config_json)
    files.update(raw or {})
    return write_dir(tmp_path / "broken", files)


def test_truncated_pth(tmp_path, official_parts, w2v_config_json, cfg, layout):
    data = layout["motion_autoencoder.pth"]
    directory = _broken_dir(tmp_path, official_parts, w2v_config_json,
                            raw={"motion_autoencoder.pth": data[: len(data) // 2]})
    with pytest.raises(WeightsError, match=r"motion_autoencoder\.pth.*download it again"):
        loading.load_model(cfg, directory)


def test_garbage_pth_and_safetensors(tmp_path, official_parts, w2v_config_json, cfg):
    garbage = b"this is not a checkpoint\n" * 40
    directory = _broken_dir(tmp_path, official_parts, w2v_config_json, raw={"flow_transformer.pth": garbage})
    with pytest.raises(WeightsError, match=r"flow_transformer\.pth is not a readable checkpoint"):
        loading.load_model(cfg, directory)
    with pytest.raises(WeightsError, match=r"x\.safetensors is not a readable checkpoint"):
        (tmp_path / "x.safetensors").write_bytes(garbage)
        loading.load_model(cfg, tmp_path / "x.safetensors")


def test_missing_key(tmp_path, official_parts, w2v_config_json, cfg):
    flow = {k: v for k, v in official_parts["flow"].items() if k != "flow_transformer.blocks.0.attn.qkv.weight"}
    directory = _broken_dir(tmp_path, official_parts, w2v_config_json, flow=flow)
    with pytest.raises(WeightsError, match=r"1 missing: flow_transformer\.blocks\.0\.attn\.qkv\.weight"):
        loading.load_model(cfg, directory)


def test_unexpected_key(tmp_path, official_parts, w2v_config_json, cfg):
    flow = {**official_parts["flow"], "flow_transformer.extra.weight": torch.zeros(3)}
    directory = _broken_dir(tmp_path, official_parts, w2v_config_json, flow=flow)
    with pytest.raises(WeightsError, match=r"1 unexpected: flow_transformer\.extra\.weight"):
        loading.load_model(cfg, directory)


def test_misshaped_key(tmp_path, official_parts, w2v_config_json, cfg):
    name = "flow_transformer.final_layer.linear.weight"
    flow = {**official_parts["flow"], name: torch.zeros(3, 3)}
    directory = _broken_dir(tmp_path, official_parts, w2v_config_json, flow=flow)
    with pytest.raises(WeightsError, match=rf"mis-shaped: {name}: file \[3, 3\] float32 vs model \[64, 128\]"):
        loading.load_model(cfg, directory)


def test_derived_buffer_with_wrong_values(tmp_path, official_parts, w2v_config_json, cfg):
    name = "flow_transformer.alignment_mask"
    flow = {**official_parts["flow"], name: ~official_parts["flow"][name]}
    directory = _broken_dir(tmp_path, official_parts, w2v_config_json, flow=flow)
    with pytest.raises(WeightsError, match=rf"derived buffer differs.*{name}"):
        loading.load_model(cfg, directory)


def test_long_problem_lists_are_truncated(tmp_path, official_parts, w2v_config_json, cfg):
    directory = _broken_dir(tmp_path, official_parts, w2v_config_json,
                            motion={"motion_autoencoder.dec.direction.weight":
                                    official_parts["motion"]["motion_autoencoder.dec.direction.weight"]})
    with pytest.raises(WeightsError, match=r"missing: .*\(\d+ more\)") as info:
        loading.load_model(cfg, directory)
    assert len(str(info.value)) < 2000 and "\n" not in str(info.value)


def test_same_key_in_two_files(tmp_path, official_parts, w2v_config_json, cfg):
    motion = {**official_parts["motion"], "flow_transformer.final_layer.linear.bias":
              official_parts["flow"]["flow_transformer.final_layer.linear.bias"]}
    directory = _broken_dir(tmp_path, official_parts, w2v_config_json, motion=motion)
    with pytest.raises(WeightsError, match=r"flow_transformer\.final_layer\.linear\.bias is in both"):
        loading.load_model(cfg, directory)


def test_wrong_config_for_the_weights(cfg):
    small_weights = load_file(str(GOLDEN / "small_weights.safetensors"))
    report = loading.check_state_dict(build_model(official(), "meta"), small_weights)
    assert not report.ok and report.mismatched


def test_offline_with_empty_cache(cfg):
    with pytest.raises(WeightsError) as info:
        loading.load_model(cfg, "hub")
    message = str(info.value)
    for part in (MIRROR_REPO, "motion_autoencoder.pth", "HF_HUB_OFFLINE", "avatar-forcing weights download",
                 "--weights DIR"):
        assert part in message


def test_incomplete_dir_and_missing_path(tmp_path, cfg):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "motion_autoencoder.pth").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"missing flow_transformer\.safetensors or flow_transformer\.pth"):
        loading.load_model(cfg, tmp_path / "partial")
    with pytest.raises(WeightsError, match="no such file or directory"):
        loading.load_model(cfg, tmp_path / "nowhere")


# -- convert ------------------------------------------------------------------------------------------------


def test_convert_round_trip(local_dir, cfg, golden):
    src = local_dir / "motion_autoencoder.pth"
    out = convert.convert_file(src)
    assert out == local_dir / "motion_autoencoder.safetensors"
    a, b = convert.load_state_dict_file(src), convert.load_state_dict_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(WeightsError, match="already safetensors"):
        convert.convert_file(out)


def test_convert_unwraps_and_all(tmp_path, official_parts, w2v_config_json, cfg, golden, capsys):
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": official_parts["motion"], "epoch": 3}, wrapped)
    assert convert.load_state_dict_file(wrapped).keys() == official_parts["motion"].keys()

    directory = write_dir(tmp_path / "d", official_files(official_parts, w2v_config_json, w2v_format="bin"))
    assert weights_cli(["convert", "--all", str(directory)]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in written) == ["flow_transformer.safetensors", "model.safetensors",
                                                     "motion_autoencoder.safetensors"]
    for name in ("motion_autoencoder.pth", "flow_transformer.pth", "wav2vec2-base-960h/pytorch_model.bin"):
        (directory / name).unlink()  # the converted files alone must be enough
    assert_matches_golden(loading.load_model(cfg, directory), golden)


def test_convert_cli_output_and_errors(tmp_path, local_dir):
    out = tmp_path / "out" / "flow.safetensors"
    out.parent.mkdir()
    assert weights_cli(["convert", str(local_dir / "flow_transformer.pth"), "-o", str(out)]) == 0
    assert out.is_file() and not (out.parent / "flow.safetensors.partial").exists()
    with pytest.raises(WeightsError, match="either one checkpoint file"):
        weights_cli(["convert"])
    with pytest.raises(WeightsError, match="does not exist"):
        weights_cli(["convert", str(tmp_path / "nope.pth")])


# -- verify / list / download -------------------------------------------------------------------------------


def test_verify_passes(local_dir, hub_cache, capsys):
    assert verify.run_verify(local_dir, str(GOLDEN)) == 0
    out = capsys.readouterr().out
    assert out.count(" ok ") == 3 and "lm_head" in out
    assert weights_cli(["verify", "--config", str(GOLDEN)]) == 0  # the hub cache
    assert weights_cli(["verify", "--weights", str(GOLDEN / "small_weights.safetensors"),
                        "--config", str(GOLDEN)]) == 0


def test_verify_reports_problems(tmp_path, official_parts, w2v_config_json, capsys):
    flow = {k: v for k, v in official_parts["flow"].items() if k != "flow_transformer.x_embedder.proj.bias"}
    directory = _broken_dir(tmp_path, official_parts, w2v_config_json, flow=flow,
                            raw={"motion_autoencoder.pth": b"garbage"})
    (directory / "wav2vec2-base-960h" / "model.safetensors").unlink()
    assert weights_cli(["verify", "--weights", str(directory), "--config", str(GOLDEN)]) == 1
    out = capsys.readouterr().out
    assert "unreadable" in out and "missing" in out and "mismatch" in out
    assert "flow_transformer.x_embedder.proj.bias" in out
    assert weights_cli(["verify", "--weights", str(GOLDEN / "small_weights.safetensors")]) == 1  # official cfg


def test_list(local_dir, hub_cache, capsys):
    assert weights_cli(["list", "--weights", str(local_dir)]) == 0
    out = capsys.readouterr().out
    assert str(local_dir / "motion_autoencoder.pth") in out and "not present" not in out
    assert weights_cli(["list", "--cache-dir", str(hub_cache.parent / "empty")]) == 0
    assert capsys.readouterr().out.count("not present") == len(CHECKPOINTS)
    assert weights_cli(["list"]) == 0  # HF_HUB_CACHE -> the populated cache
    assert "snapshots" in capsys.readouterr().out


def test_download_offline(hub_cache, tmp_path, capsys):
    assert weights_cli(["download"]) == 0  # everything is cached: nothing to fetch
    out = capsys.readouterr().out
    assert str(hub_cache) in out and "model.safetensors" in out
    with pytest.raises(WeightsError, match=rf"{MIRROR_REPO}.*HF_HUB_OFFLINE"):
        weights_cli(["download", "--cache-dir", str(tmp_path / "empty")])
    with pytest.raises(WeightsError, match=r"not in .*target"):
        weights_cli(["download", "--dir", str(tmp_path / "target")])


def test_cached_files_need_no_network(hub_cache, tmp_path, layout, monkeypatch):
    """Online mode still serves cached / already-placed files without asking the hub."""
    import huggingface_hub

    calls = []
    real = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    files = hub.official_files_from_hub(offline=False)
    assert files.flow_transformer.parent.parent.name == "snapshots" and calls and all(calls)

    target = write_dir(tmp_path / "target", layout)
    assert weights_cli(["download", "--dir", str(target)]) == 0
    assert hub.official_files_in_dir(target).wav2vec2 == target / "wav2vec2-base-960h" / "model.safetensors"


def test_unused_parameter_may_be_absent(cfg, golden, tmp_path):
    """masked_spec_embed is never read at inference: its absence is reported, not fatal."""
    name = W2V + "masked_spec_embed"
    report = loading.load_into(build_model(cfg), {k: v for k, v in golden.items() if k != name})
    assert report.ok and report.unused_missing == [name] and name in report.summary()
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(WeightsError, match="holds no tensors"):
        convert.load_state_dict_file(tmp_path / "empty.pth")
