"""`vosops propagate`: masks for a video (folder of frames or video file) or for every sequence of a DAVIS-layout
dataset, sharded over torchrun ranks."""

from __future__ import annotations

import os
import sys
import time

from ._args import positive_int, resolve_device


def register(sub) -> None:
    p = sub.add_parser("propagate", help="propagate a first-frame mask through a video or a DAVIS-layout dataset")
    p.add_argument("source", nargs="?", help="folder of frames (.jpg/.png in frame order) or a video file")
    p.add_argument("--mask", help="first-frame mask PNG (DAVIS-2017 palette or DAVIS-2016 0/255)")
    p.add_argument("--dataset", help="DAVIS-layout root (JPEGImages/480p, Annotations/480p): every sequence")
    p.add_argument("--imageset", help="with --dataset: a sequence list (e.g. 2017/val.txt under ImageSets/)")
    p.add_argument("--out", required=True, help="output folder (one palette PNG per frame, named after the frame)")
    p.add_argument("--preset", default=None, help="mamp, maskvos, ino, dino, jointformer-memory[-ytvos] "
                   "(default: the weight-free extractor with a local top-k readout)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--backend", default=None, help="op backend: auto, reference, cpu, cuda, triton")
    p.add_argument("--flow", choices=["auto", "none", "dis", "farneback"], default="auto",
                   help="flow-displaced windows (local readouts only). auto (default): the preset's protocol "
                   "(mamp: OpenCV DIS, standing in for MAMP's RAFT; the others and the weight-free default: none)")
    p.add_argument("--no-overlay", action="store_true", help="skip the overlay MP4")
    p.add_argument("--eval", action="store_true", help="with --dataset: evaluate J&F against its annotations")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads")
    p.set_defaults(func=run)


def build_engine(preset: str | None, device, flow: str = "auto"):
    """The engine for a preset with the weight-free extractor (no checkpoints ship with vosops). flow: "auto" (the
    preset's own), "none", "dis" or "farneback"."""
    from vosops.propagation import LabPositionFeatures, Propagator, TopKAttentionReadout, get_preset, weight_free

    flow_arg = None if flow in ("none", "auto") else flow
    if preset is None:
        eng = weight_free(device=device)
        eng.flow = flow_arg
        return eng, "weight-free Lab+position features (stride 4), MAMP memory, local top-36 readout r=12"
    p = get_preset(preset)
    if isinstance(p.readout, TopKAttentionReadout):
        p.readout.heads = 2  # the weight-free features have 10 channels, not 12 heads x 64
    if flow_arg is not None and not getattr(p.readout, "uses_offsets", False):
        raise ValueError(f"--flow {flow}: preset {p.name}'s readout takes no flow offsets (only local readouts do)")
    if flow != "auto":
        p.flow = flow_arg
    eng = Propagator(LabPositionFeatures(stride=p.stride), device=device, **p.engine_kwargs())
    desc = f"preset {p.name} with weight-free features at stride {p.stride}: {p.readout!r}, {p.memory!r}"
    return eng, desc + (f", {p.flow} flow" if p.flow else "")


class Progress:
    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.t0 = total, label, time.perf_counter()
        self.stream = stream if stream is not None else sys.stderr

    def update(self, done: int) -> None:
        if not self.stream.isatty() and done not in (self.total,) and done % 10:
            return
        width = 30
        fill = int(width * done / max(self.total, 1))
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} {rate:.1f} fps")
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def propagate_video(engine, reader, first_mask, out_dir: str, overlay: bool = True, label: str = "") -> tuple:
    """Run the engine over a VideoReader, writing masks (and an overlay MP4) from the writer thread.
    Returns (frames, seconds)."""
    from vosops.propagation import MaskWriter

    writer = MaskWriter(out_dir, overlay_video=os.path.join(out_dir, "overlay.mp4") if overlay else None)
    frames_np = iter(reader)
    bar = Progress(len(reader), label or os.path.basename(os.path.normpath(reader.path)))
    t0 = time.perf_counter()
    n = 0
    held = []

    def frames():  # keep each frame for its overlay without reading the video twice
        for f in frames_np:
            held.append(f)
            yield f

    try:
        for t, ids in engine.propagate(frames(), {0: first_mask}):
            writer.put(reader.names[t], ids, held.pop(0) if overlay else None)
            if not overlay:
                held.clear()
            n += 1
            bar.update(n)
    finally:
        writer.close()
    return n, time.perf_counter() - t0


def _dist_info():
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def run(args) -> int:
    import torch

    import vosops
    from vosops.io import DavisDataset, VideoReader, read_mask

    if args.threads:
        torch.set_num_threads(args.threads)
    # a bad argument is a ValueError: cli.main prints it as one line (exit 2), or re-raises under VOSOPS_DEBUG
    if (args.source is None) == (args.dataset is None):
        raise ValueError("give either a video (SOURCE --mask FIRST.png) or --dataset ROOT")
    rank, world, local = _dist_info()
    device = resolve_device(args.device, local)
    if args.backend and args.backend != "auto" and args.backend not in vosops.BACKENDS:
        raise ValueError(f"--backend must be 'auto' or one of {vosops.BACKENDS}, got {args.backend!r}")
    backend_ctx = vosops.use_backend(args.backend) if args.backend else _null()
    engine, desc = build_engine(args.preset, device, args.flow)
    with backend_ctx:
        if args.source is not None:
            if not args.mask:
                raise ValueError("--mask FIRST.png is required with a video")
            reader = VideoReader(args.source)
            if reader.is_folder and os.path.realpath(args.out) == os.path.realpath(args.source):
                raise ValueError(f"--out {args.out!r} is the frames' folder: the masks (<frame>.png) would overwrite "
                                 "PNG frames or be read as frames next time; choose another folder")
            mask = read_mask(args.mask)
            if mask.shape != tuple(reader.size):
                raise ValueError(f"mask {mask.shape} and frames {tuple(reader.size)} differ in size")
            print(f"vosops propagate: {len(reader)} frames of {reader.size[1]}x{reader.size[0]} on {device}; {desc}")
            n, dt = propagate_video(engine, reader, mask, args.out, overlay=not args.no_overlay)
            print(f"wrote {n} masks to {args.out} ({n / dt:.2f} frames/s, {dt:.2f} s including IO)")
            return 0
        return _run_dataset(args, engine, desc, device, rank, world)


def _run_dataset(args, engine, desc, device, rank, world) -> int:
    import torch

    from vosops.io import DavisDataset

    ds = DavisDataset(args.dataset, imageset=args.imageset)
    group = None
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        group = dist
    mine = ds.sequences[rank::world]
    print(f"[rank {rank}/{world}] {len(mine)} of {len(ds)} sequences on {device}: {', '.join(mine)}; {desc}",
          flush=True)
    total_n, total_t = 0, 0.0
    for seq in mine:
        try:
            n, dt = propagate_video(engine, ds.frames(seq), ds.first_mask(seq), os.path.join(args.out, seq),
                                    overlay=not args.no_overlay, label=f"[rank {rank}] {seq}")
        except ValueError as e:  # name the sequence: the message alone may not say which one
            raise ValueError(f"sequence {seq!r}: {e}") from e
        total_n, total_t = total_n + n, total_t + dt
        print(f"[rank {rank}] {seq}: {n} frames, {n / dt:.2f} frames/s", flush=True)
    if group is not None:
        stats = torch.tensor([total_n, total_t], dtype=torch.float64)
        group.all_reduce(stats)
        total_n, total_t = int(stats[0]), float(stats[1])
        group.barrier()
    code = 0
    if rank == 0:
        print(f"all ranks: {total_n} frames, {total_n / max(total_t, 1e-9):.2f} frames/s per process")
        if args.eval:
            from vosops import metrics

            scores, table, summary = metrics.evaluate_folders(args.out, args.dataset, sequences=ds.sequences)
            print(metrics.format_table(table, summary, metrics.unscored_sequences(ds.sequences, table)))
            metrics.write_csv(os.path.join(args.out, "results.csv"), scores, table, summary)
    if group is not None:
        group.barrier()
        group.destroy_process_group()
    return code


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
