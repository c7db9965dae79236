"""`avatar-forcing train`: the motion auto-encoder on face videos (LIA reconstruction), the flow
transformer on training shards (diffusion forcing), then label-free DPO. Run under
`torchrun --nproc_per_node N` for several GPUs / nodes (DDP).

    avatar-forcing train autoencoder --videos clips/ --weights hub --out runs/ae
    avatar-forcing train transformer --data shards/ --weights hub --out runs/fm
    avatar-forcing train dpo --data shards/ --weights runs/fm/model.safetensors --out runs/dpo
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .errors import UserError

log = logging.getLogger("avatar_forcing.train")


def add_train_command(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the motion auto-encoder or the transformer (flow matching, DPO)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    add_autoencoder_command(kinds)
    add_scale_latents_command(kinds)
    add_canonical_code_command(kinds)
    add_user_expression_command(kinds)
    for kind, text in (("transformer", "diffusion-forcing flow matching"), ("dpo", "label-free Diffusion-DPO")):
        k = kinds.add_parser(kind, help=text)
        k.add_argument("--data", required=True, type=Path, help="shard folder (index.json)")
        k.add_argument("--out", required=True, type=Path, help="run folder: checkpoint, metrics.csv, state")
        k.add_argument("--config", default="official", help="'official' or a folder with small_config.json")
        k.add_argument("--weights", default=None,
                       help="starting weights ('hub', a folder, a .safetensors file; 'none' = random init)")
        k.add_argument("--device", default="auto")
        k.add_argument("--steps", type=int, default=10_000)
        k.add_argument("--batch", type=int, default=8, help="windows per process per micro-batch")
        k.add_argument("--accumulation", type=int, default=1)
        k.add_argument("--lr", type=float, default=1e-4 if kind == "transformer" else 1e-5)
        k.add_argument("--warmup", type=int, default=500 if kind == "transformer" else 50)
        k.add_argument("--ema", type=float, default=0.999)
        k.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
        k.add_argument("--block-noise", action="store_true",
                       help="one noise level per 10-frame block (the reference) instead of per frame")
        k.add_argument("--clean-prefix", type=float, default=0.0, help="probability of a clean history prefix")
        k.add_argument("--branch-dropout", type=float, nargs=3, default=None,
                       metavar=("AUDIO_ONLY", "USER_ONLY", "UNCOND"),
                       help="shares of windows trained as each guidance branch (default 0.1 each, the reference's); "
                            "sampling uses only these three branches, so a small model trained briefly needs more")
        k.add_argument("--save-every", type=int, default=1000)
        k.add_argument("--seed", type=int, default=0)
        k.add_argument("--no-progress", action="store_true")
        if kind == "dpo":
            k.add_argument("--beta", type=float, default=None, help="default: DPOSettings' (docs/training.md §3)")
            k.add_argument("--sft-weight", type=float, default=1.0, help="lambda: flow-matching loss on winners")
            k.add_argument("--dpo-velocity", choices=("branch", "full", "guided"), default=None,
                           help="the velocity the preference compares (docs/training.md, DPO experiments)")
            k.add_argument("--losers", type=Path, default=None,
                           help="shard folder whose clips carry losers (default: generate once into OUT/losers)")
        k.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from avatar_forcing.model.avatar_forcing import build_model
    from avatar_forcing.model.config import config_from_name
    from avatar_forcing.model.device import pick_device
    from avatar_forcing.model.training.data import load_shards, save_shards
    from avatar_forcing.model.training.flow_matching import DropoutSettings, NoiseSettings
    from avatar_forcing.model.training.loop import Distributed, LoopSettings
    from avatar_forcing.model.training.objectives import DPOSettings, FlowSettings
    from avatar_forcing.model.training.rollout import generate_latents
    from avatar_forcing.model.training.transformer import transformer_trainer
    from avatar_forcing.weights.loading import load_model

    cfg = config_from_name(args.config)
    device = pick_device(args.device)
    dist_info = Distributed.from_environment(device)
    if device.type == "cuda" and dist_info.active:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    model = (build_model(cfg, device) if args.weights == "none"
             else load_model(cfg, args.weights, device=device, start_fresh=training_fresh_start()))
    try:
        clips = load_shards(args.data)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    dpo = None
    if args.kind == "dpo":
        chosen = {k: v for k, v in (("beta", args.beta), ("velocity", args.dpo_velocity)) if v is not None}
        dpo = DPOSettings(sft_weight=args.sft_weight, guidance=(cfg.sampler.a_cfg_scale, cfg.sampler.u_cfg_scale),
                          **chosen)
        cache = args.losers or args.out / "losers"
        if (cache / "index.json").exists():
            clips = load_shards(cache)
        else:  # every process generates the same losers (same seeds); only rank 0 writes them
            for clip, loser in zip(clips, generate_latents(model, clips, seed=args.seed, drop_user=True), strict=False):
                clip.loser = loser
            if dist_info.main:
                save_shards(clips, cache)
    loop = LoopSettings(steps=args.steps, micro_batch=args.batch, accumulation=args.accumulation, lr=args.lr,
                        warmup=args.warmup, ema_decay=args.ema, bf16=args.bf16, save_every=args.save_every,
                        seed=args.seed, progress=not args.no_progress)
    noise = NoiseSettings(per_frame=not args.block_noise, block_frames=cfg.transformer.block_frames,
                          clean_prefix=args.clean_prefix)
    try:
        dropout = DropoutSettings(*args.branch_dropout) if args.branch_dropout else DropoutSettings()
    except ValueError as exc:
        raise UserError(f"--branch-dropout: {exc}") from None
    flow = FlowSettings(noise, dropout)
    try:
        trainer = transformer_trainer(model, clips, loop, args.out, flow=flow, dpo=dpo, device=device,
                                      dist_info=dist_info)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    trainer.resume()
    history = trainer.run()
    if history and dist_info.main:
        log.info("step %d: loss %.4f; checkpoint %s", trainer.step, history[-1]["loss"], args.out / "model.safetensors")
    return 0


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


def training_fresh_start() -> tuple[str, ...]:
    """Parts of our extensions a training command's starting checkpoint may lack (they keep their initial
    values): the user residual's zero-initialised layer, the canonical code's buffers, set by `canonical-code`,
    and the user-expression maps, set by `user-expression`."""
    from avatar_forcing.model.canonical import EXTENSION_BUFFERS
    from avatar_forcing.model.dual_motion_encoder import EXTENSION_LAYERS
    from avatar_forcing.model.user_expression import EXTENSION_BUFFERS as EXPRESSION_BUFFERS

    return EXTENSION_LAYERS + EXTENSION_BUFFERS + EXPRESSION_BUFFERS


def training_looks(looks: int, size: int) -> list:
    """`looks` S x S looks of the packaged portrait: the looks `data conversations` gives seeds 1, 2, ... (eight
    per seed), so the auto-encoder, its canonical code and the conversations see the same faces."""
    from avatar_forcing.model.media.face import crop_portrait
    from avatar_forcing.model.media.image import load_image
    from avatar_forcing.model.training.conversations import augmented, packaged_portraits

    portraits = packaged_portraits()
    if not portraits:
        raise UserError("--rig-looks needs matplotlib's sample portrait (`make install-train`)")
    face = crop_portrait(load_image(next(iter(portraits.values()))), size)
    return [augmented(face, 1000 * (1 + i // 8) + i % 8) for i in range(looks)]


def rig_pairs(looks: int, size: int, seed: int):
    """`RigPairs` over `training_looks`."""
    from avatar_forcing.errors import NoFaceError
    from avatar_forcing.model.training.rig import FaceRig
    from avatar_forcing.model.training.rig_pairs import RigPairs

    try:
        rigs = [FaceRig(look) for look in training_looks(looks, size)]
    except NoFaceError as exc:
        raise UserError(f"a look of the sample portrait has no face for the rig: {exc}") from None
    return RigPairs(rigs, seed=seed)


def code_field_weights(pairs: list[str]) -> tuple[float, ...]:
    """`--code-field-weight smile=8 ...` -> one weight per rig code field (1 where not given); () when none."""
    from avatar_forcing.model.training.rig_pairs import CODE_FIELDS

    if not pairs:
        return ()
    weights = dict.fromkeys(CODE_FIELDS, 1.0)
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in weights:
            raise UserError(f"--code-field-weight {pair}: no field {name!r}; the fields are {' '.join(CODE_FIELDS)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UserError(f"--code-field-weight {pair}: the weight must be a number, as in smile=8") from None
        if weights[name] < 0:
            raise UserError(f"--code-field-weight {pair}: the weight must be 0 or more")
    return tuple(weights.values())


def saved_step(out: Path) -> int:
    """The step of a run folder's saved training state (0 when there is none)."""
    import torch

    from avatar_forcing.model.training.loop import STATE_NAME

    path = out / STATE_NAME
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"]) if path.exists() else 0


def add_autoencoder_command(kinds) -> None:
    k = kinds.add_parser("autoencoder", help="the motion auto-encoder (LIA reconstruction of frame pairs)")
    k.add_argument("--videos", nargs="+", type=Path, default=[],
                   help="face videos, or folders of them: one clip each; pairs are two frames of one clip")
    k.add_argument("--rig-looks", type=int, default=0,
                   help="instead of videos: pairs rendered on the fly by the face rig from this many looks of the "
                        "packaged public-domain portrait, with their expressions (see --code-weight)")
    k.add_argument("--code-weight", type=float, default=0.0,
                   help="rig pairs: weight of the motion magnitudes' regression onto the known expression")
    k.add_argument("--code-field-weight", action="append", default=[], metavar="FIELD=W",
                   help="rig pairs: weight of one expression field (e.g. smile) inside the code term (default 1 "
                        "each; an unknown name lists the fields); repeat for several")
    k.add_argument("--teacher", type=float, default=0.0,
                   help="rig pairs: share of pairs whose decoder gets the known expression (teacher forcing)")
    k.add_argument("--motion-lr-scale", type=float, default=1.0,
                   help="learning-rate multiplier of the motion MLP (enc.fc): it must amplify small differences "
                        "of the appearance code into motion magnitudes")
    k.add_argument("--out", required=True, type=Path,
                   help="run folder: motion_autoencoder.safetensors, model.safetensors, metrics.csv, state")
    k.add_argument("--config", default="official", help="'official' or a folder with small_config.json")
    k.add_argument("--weights", default=None, help="starting weights ('hub', a folder, a file; 'none' = random)")
    k.add_argument("--device", default="auto")
    k.add_argument("--steps", type=int, default=20_000)
    k.add_argument("--batch", type=int, default=8, help="pairs per process per micro-batch")
    k.add_argument("--accumulation", type=int, default=1)
    k.add_argument("--lr", type=float, default=2e-5)
    k.add_argument("--warmup", type=int, default=200)
    k.add_argument("--ema", type=float, default=0.999)
    k.add_argument("--bf16", action="store_true")
    k.add_argument("--max-frames", type=int, default=500, help="frames kept per clip (evenly spaced)")
    k.add_argument("--min-gap", type=int, default=5, help="least distance in frames between source and driving")
    k.add_argument("--ssim-weight", type=float, default=0.5)
    k.add_argument("--gradient-weight", type=float, default=0.5)
    k.add_argument("--moving-weight", type=float, default=0.0,
                   help="L1 where source and driving differ (teaches motion early; docs/training.md §0b)")
    k.add_argument("--mouth-weight", type=float, default=0.0,
                   help="with --rig-looks: L1 inside the mouth region, where a smile's few pixels are "
                        "(docs/training.md §6)")
    k.add_argument("--perceptual", type=Path, default=None,
                   help="a local TorchScript perceptual network (images in [-1,1] -> features); none by default")
    k.add_argument("--perceptual-weight", type=float, default=1.0)
    k.add_argument("--finest-lr-scale", type=float, default=1.0,
                   help="learning-rate multiplier of the decoder's finest level (from scratch it lags, and the frame "
                        "is drawn one level down: blurred)")
    k.add_argument("--freeze-motion", action="store_true",
                   help="train the decoder only: motion latents (prepared shards, a transformer trained on them) "
                        "stay valid; start it from --weights FILE in a new --out")
    k.add_argument("--save-every", type=int, default=1000)
    k.add_argument("--until", type=int, default=None,
                   help="stop after this step (the schedule still runs to --steps; run again to go on)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(func=run_train_autoencoder)


def add_scale_latents_command(kinds) -> None:
    k = kinds.add_parser("scale-latents",
                         help="make a trained auto-encoder's motion latents FACTOR times larger, frames unchanged "
                              "(before preparing the transformer's data)")
    k.add_argument("--weights", required=True, help="the trained model (a .safetensors file or folder)")
    k.add_argument("--config", default="official", help="'official' or a folder with small_config.json")
    k.add_argument("--factor", required=True, type=float,
                   help="e.g. 1 / the latents' standard deviation per dimension, so they are about unit variance "
                        "against flow matching's unit noise (docs/training.md §6)")
    k.add_argument("--out", required=True, type=Path, help="the rescaled model's .safetensors file")
    k.set_defaults(func=run_scale_latents)


def run_scale_latents(args: argparse.Namespace) -> int:
    from avatar_forcing.model.config import config_from_name
    from avatar_forcing.model.training.autoencoder import scale_motion_latents
    from avatar_forcing.weights.convert import save_safetensors
    from avatar_forcing.weights.loading import load_model

    if not args.factor > 0:
        raise UserError(f"--factor must be positive, not {args.factor}")
    if args.out.suffix != ".safetensors":
        raise UserError(f"--out must name a .safetensors file, not {args.out}")
    model = load_model(config_from_name(args.config), args.weights, start_fresh=training_fresh_start())
    scale_motion_latents(model.motion_autoencoder, args.factor)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), args.out, source=f"{args.weights}, motion latents x{args.factor:g}")
    print(f"{args.out}: motion latents x{args.factor:g}, frames unchanged")
    return 0


def add_canonical_code_command(kinds) -> None:
    k = kinds.add_parser("canonical-code",
                         help="set a model's canonical code (the `canonical_code` extension) to the mean code of "
                              "its training faces")
    k.add_argument("--weights", required=True, help="the model (a .safetensors file or folder)")
    k.add_argument("--config", default="official", help="a configuration with the canonical_code extension")
    faces = k.add_mutually_exclusive_group(required=True)
    faces.add_argument("--rig-looks", type=int, default=0,
                       help="the first N looks of the packaged portrait (those `train autoencoder --rig-looks` "
                            "trained on)")
    faces.add_argument("--portraits", type=Path, nargs="+", default=[],
                       help="face images (cropped to the face as a served portrait is)")
    k.add_argument("--out", required=True, type=Path, help="the model's .safetensors file, its code set")
    k.set_defaults(func=run_canonical_code)


def extension_model(args: argparse.Namespace, extension: str, without: str):
    """`--weights` under `--config`, for a command that sets the buffers of one of our motion auto-encoder
    extensions; refuses an `--out` that is not a .safetensors file and a configuration without the extension
    (`without`: what its models do instead)."""
    from avatar_forcing.model.config import config_from_name
    from avatar_forcing.weights.loading import load_model

    if args.out.suffix != ".safetensors":
        raise UserError(f"--out must name a .safetensors file, not {args.out}")
    cfg = config_from_name(args.config)
    if not getattr(cfg.motion, extension):
        raise UserError(f"--config {args.config} has no {extension} extension: {without}, so there is nothing "
                        "to set")
    return load_model(cfg, args.weights, start_fresh=training_fresh_start())


def save_model(model, out: Path, source: str) -> None:
    from avatar_forcing.weights.convert import save_safetensors

    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), out, source=source)


def run_canonical_code(args: argparse.Namespace) -> int:
    import torch

    from avatar_forcing.model.media.face import crop_portrait
    from avatar_forcing.model.media.image import load_image, to_model_input

    if not args.portraits and args.rig_looks < 1:
        raise UserError(f"--rig-looks must be at least 1, not {args.rig_looks}")
    model = extension_model(args, "canonical_code", "its models animate every portrait in its own code")
    mae = model.motion_autoencoder
    assert mae.canonical is not None
    size = model.config.motion.input_size
    faces = (training_looks(args.rig_looks, size) if args.rig_looks
             else [crop_portrait(load_image(path), size) for path in args.portraits])
    with torch.inference_mode():
        codes = [mae.encode_portrait(to_model_input(face)) for face in faces]
        mae.canonical.set_from(torch.cat([c.s_r for c in codes]), torch.cat([c.r_s for c in codes]))
    save_model(model, args.out, f"{args.weights}, canonical code of {len(faces)} faces")
    print(f"{args.out}: canonical code set from {len(faces)} faces (appearance norm "
          f"{float(mae.canonical.appearance.norm()):.2f}, motion norm {float(mae.canonical.motion.norm()):.2f})")
    return 0


def add_user_expression_command(kinds) -> None:
    k = kinds.add_parser("user-expression",
                         help="fit a model's user-expression maps (the `user_expression` extension: the user's "
                              "webcam read by the face mesh) on rig renders of its training faces")
    k.add_argument("--weights", required=True, help="the model (a .safetensors file or folder), canonical code set")
    k.add_argument("--config", default="official", help="a configuration with the user_expression extension")
    k.add_argument("--rig-looks", type=int, required=True,
                   help="the first N looks of the packaged portrait (those `train autoencoder --rig-looks` "
                        "trained on)")
    k.add_argument("--renders", type=int, default=100, help="random expressions rendered per look")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--out", required=True, type=Path, help="the model's .safetensors file, its maps set")
    k.set_defaults(func=run_user_expression)


def run_user_expression(args: argparse.Namespace) -> int:
    from avatar_forcing.model.training.user_expression import fit_user_expression

    if args.rig_looks < 1 or args.renders < 1:
        raise UserError(f"--rig-looks and --renders must be at least 1, not {args.rig_looks} and {args.renders}")
    model = extension_model(args, "user_expression", "its models read the user's webcam with the motion encoder")
    fit = fit_user_expression(model.motion_autoencoder,
                              training_looks(args.rig_looks, model.config.motion.input_size), args.renders,
                              seed=args.seed)
    save_model(model, args.out, f"{args.weights}, user-expression maps of {args.rig_looks} looks x {args.renders}")
    print(f"{args.out}: user-expression maps set from {fit.line()}")
    return 0


def video_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not files:
        raise UserError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return files


def run_train_autoencoder(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from avatar_forcing.errors import MediaError
    from avatar_forcing.model.avatar_forcing import build_model
    from avatar_forcing.model.config import config_from_name
    from avatar_forcing.model.device import pick_device
    from avatar_forcing.model.training.autoencoder import (
        ReconstructionWeights,
        autoencoder_trainer,
        crops_of_video,
        finest_level,
        load_perceptual,
        start_with_still_warps,
    )
    from avatar_forcing.model.training.loop import Distributed, LoopSettings
    from avatar_forcing.weights.loading import load_model

    cfg = config_from_name(args.config)
    device = pick_device(args.device)
    dist_info = Distributed.from_environment(device)
    if device.type == "cuda" and dist_info.active:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if bool(args.videos) == bool(args.rig_looks):
        raise UserError("give either --videos or --rig-looks")
    if args.mouth_weight and not args.rig_looks:
        raise UserError("--mouth-weight needs --rig-looks: only rig-rendered pairs know where the mouth is")
    files = video_files(args.videos) if args.videos else []
    if args.until is not None and (done := saved_step(args.out)) >= args.until:
        log.info("%s is at step %d already (--until %d): nothing to do", args.out, done, args.until)
        return 0
    if args.weights == "none":
        torch.manual_seed(args.seed)  # the random start is part of the recipe
        model = build_model(cfg, device)
        start_with_still_warps(model.motion_autoencoder)
    else:
        model = load_model(cfg, args.weights, device=device, start_fresh=training_fresh_start())
    size = model.config.motion.input_size
    clips = []
    for path in tqdm(files, desc="face crops", unit="clip", disable=args.no_progress or not dist_info.main):
        try:
            clips.append(crops_of_video(path, size, max_frames=args.max_frames))
        except MediaError as exc:
            raise UserError(f"{path}: {exc}") from exc
    pairs = rig_pairs(args.rig_looks, size, args.seed) if args.rig_looks else None
    perceptual = None
    if args.perceptual is not None:
        try:
            perceptual = load_perceptual(args.perceptual, device)
        except (FileNotFoundError, RuntimeError) as exc:
            raise UserError(str(exc)) from exc
    weights = ReconstructionWeights(ssim=args.ssim_weight, gradient=args.gradient_weight,
                                    perceptual=args.perceptual_weight, moving=args.moving_weight,
                                    mouth=args.mouth_weight,
                                    code=args.code_weight, teacher=args.teacher,
                                    code_fields=code_field_weights(args.code_field_weight))
    lr_scales = {prefix: args.finest_lr_scale for prefix in finest_level(model.motion_autoencoder)}
    lr_scales["enc.fc."] = args.motion_lr_scale
    lr_scales = {prefix: scale for prefix, scale in lr_scales.items() if scale != 1.0}
    loop = LoopSettings(steps=args.steps, micro_batch=args.batch, accumulation=args.accumulation, lr=args.lr,
                        warmup=args.warmup, ema_decay=args.ema, bf16=args.bf16, save_every=args.save_every,
                        seed=args.seed, progress=not args.no_progress,
                        lr_scale=lr_scales)
    try:
        trainer = autoencoder_trainer(model, clips, loop, args.out, weights, perceptual, device, dist_info,
                                      min_gap=args.min_gap, pairs=pairs, freeze_motion=args.freeze_motion)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    trainer.resume()
    history = trainer.run(until=args.until)
    if history and dist_info.main:
        log.info("step %d: loss %.4f; checkpoints %s, %s", trainer.step, history[-1]["loss"],
                 args.out / "motion_autoencoder.safetensors", args.out / "model.safetensors")
    return 0
