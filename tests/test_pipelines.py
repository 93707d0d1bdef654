"""dsp_fast.pipelines on CPU: DALI (device_id=None) and torch backends agree crop for crop, labels stay aligned and
valid, long-tail crops hold their class, DDP shards cover an epoch once, bad files are named."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest
import torch
from helpers_data import make_cityscapes, make_gta5, run_prepare
from PIL import Image

from dsp_fast.data import DatasetError
from dsp_fast.pipelines import build_loaders, prepared
from dsp_fast.pipelines.loader import _nchw
from dsp_fast.pipelines.plan import Planner, ShardedSampler

CROP = (32, 24)  # (width, height); the prepared source is 64x40, the target 48x32
LONG_TAIL = (12, 17, 18)  # rider, motorcycle (absent from the fixtures: skipped), bicycle


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("pipelines")
    gta5 = make_gta5(str(base / "gta5"), 8, (80, 48))
    cs = make_cityscapes(str(base / "cs"), {"train": 5}, (48, 32), seed=1)
    out = {fmt: str(base / f"src_{fmt}") for fmt in ("png", "jpeg")}
    for fmt, path in out.items():
        assert run_prepare(gta5, path, "--size", "64", "40", "--format", fmt, "--long-tail-size", "96", "60",
                           "--crop", *map(str, CROP)) == 0
    assert run_prepare(cs, str(base / "tgt"), "--size", "48", "32", "--split", "train", dataset="cityscapes") == 0
    out["tgt"] = str(base / "tgt" / "train")
    return out


def make_loader(sets, backend: str, fmt: str = "png", source: str | None = None, **kw):
    args = {"crop_size": CROP, "batch_size": 2, "device": "cpu", "num_threads": 1 if backend == "dali" else 0,
            "seed": 3, "long_tail_classes": LONG_TAIL, "num_long_tail": 2, "flip": True, **kw}
    return build_loaders(source or sets[fmt], sets["tgt"], backend=backend, **args)


def read(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB") if im.mode != "L" else im)


def expected_crops(ds: prepared.PreparedSet, plan, labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The planned windows cut straight out of the prepared files with numpy: the oracle of both backends."""
    (cw, ch), imgs, labs = CROP, [], []
    for i, (y0, x0), flip in zip(plan.indices, plan.windows, plan.flips):
        sl = (slice(y0, y0 + ch), slice(x0, x0 + cw, None))
        img, lab = read(ds.image_path(i))[sl], read(ds.label_path(i))[sl] if labels else None
        imgs.append(img[:, ::-1] if flip else img)
        labs.append(None if lab is None else (lab[:, ::-1] if flip else lab))
    return np.stack(imgs), (np.stack(labs) if labels else None)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_dali_and_torch_give_the_planned_crops_pixel_for_pixel(sets, fmt):
    dali, ref = make_loader(sets, "dali", fmt), make_loader(sets, "torch", fmt)
    src, tgt = dali.planner.source, dali.planner.target
    flips = 0
    for step in range(3):
        a, b = next(dali), next(ref)
        assert set(a) == set(b) and a["lt_class"].tolist() == b["lt_class"].tolist()
        for key in a:  # CPU DALI and PIL both decode JPEG with libjpeg-turbo: tolerance 0 (a GPU decoder may differ)
            assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), (step, key)
        plan = dali.planner.source_plan(step)
        img, lab = expected_crops(src, plan, labels=True)
        got = torch.cat([a["src_img"], a["tmpl_img"]]).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(got, img)
        np.testing.assert_array_equal(torch.cat([a["src_label"], a["tmpl_label"]]).numpy(), lab)
        lt_plan = dali.planner.long_tail_plan(step)
        img, lab = expected_crops(dali.planner.long_tail, lt_plan, labels=True)
        np.testing.assert_array_equal(a["lt_img"].permute(0, 2, 3, 1).numpy(), img)
        np.testing.assert_array_equal(a["lt_label"].numpy(), lab)
        assert a["lt_class"].tolist() == lt_plan.classes
        img, _ = expected_crops(tgt, dali.planner.target_plan(step), labels=False)
        np.testing.assert_array_equal(a["tgt_img"].permute(0, 2, 3, 1).numpy(), img)
        flips += sum(plan.flips)
    assert flips > 0  # the flip path ran


def test_outputs_are_channels_last_uint8_and_labels_hold_only_train_ids(sets):
    batch = next(make_loader(sets, "dali"))
    for key in ("src_img", "tmpl_img", "lt_img", "tgt_img"):
        x = batch[key]
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, CROP[1], CROP[0])
        assert x.is_contiguous(memory_format=torch.channels_last), key
    # B = 2 images per domain; each template image its own crop of each of the 2 long-tail classes
    assert batch["src_img"].shape[0] == batch["tgt_img"].shape[0] == 2 and batch["lt_img"].shape[0] == 4
    labels = torch.cat([batch["src_label"], batch["tmpl_label"], batch["lt_label"]])
    assert labels.dtype == torch.uint8 and labels.shape[1:] == (CROP[1], CROP[0])
    assert set(labels.unique().tolist()) <= set(range(19)) | {255}
    nhwc = torch.zeros(2, 5, 7, 3, dtype=torch.uint8)
    assert _nchw(nhwc).data_ptr() == nhwc.data_ptr()  # NHWC -> channels_last NCHW is a view, no copy


def test_a_dropped_dali_loader_stops_its_pipelines_at_once(sets):
    loader = make_loader(sets, "dali")
    next(loader)
    refs = [weakref.ref(loader.source.pipe), weakref.ref(loader.target.pipe)]
    gc.disable()  # no reference cycle: freed by refcount, never later by a GC pass in a forked child
    try:
        del loader
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_a_forked_child_never_destroys_the_parents_pipelines(sets):
    """A DataLoader worker forked while a DALI loader lives must not run the pipeline's destructor: it joins
    threads that exist only in the parent and hangs. Made worse by a reference cycle, forced here."""
    loader = make_loader(sets, "dali")
    next(loader)
    loader.source.pipe._cycle = loader.source.pipe  # only a GC pass can free it now
    del loader
    pid = os.fork()
    if pid == 0:
        gc.collect()
        os._exit(0)
    for _ in range(200):  # 20 s at most; the collection takes milliseconds
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung destroying an inherited DALI pipeline")
    assert status == 0
    gc.collect()  # free the parent's copy too


def test_long_tail_crops_contain_their_class(sets):
    loader, seen = make_loader(sets, "dali", "jpeg"), set()
    assert loader.planner.candidates == [12, 18]  # motorcycle is in no image: skipped
    for _ in range(8):
        batch = next(loader)
        classes = batch["lt_class"].tolist()
        assert len(set(classes)) == 2
        for k, label in enumerate(batch["lt_label"]):  # crop b*L + l holds class l
            assert (label == classes[k % 2]).any(), (k, classes)
        seen.update(classes)
    assert seen == {12, 18}


def test_two_ranks_cover_every_epoch_exactly_once():
    n, world = 7, 2
    ranks = [ShardedSampler(n, r, world, seed=5) for r in range(world)]
    orders = []
    for epoch in range(4):
        parts = [s.epoch_indices(epoch) for s in ranks]
        assert sorted(np.concatenate(parts).tolist()) == list(range(n)), epoch
        assert {len(p) for p in parts} <= {n // world, n // world + 1}
        orders.append(ranks[0].permutation(epoch).tolist())
    assert len({tuple(o) for o in orders}) == 4  # reshuffled every epoch
    for s in ranks:  # the per-step stream is the concatenation of the rank's epoch shares
        np.testing.assert_array_equal(s.take(0, 4 * n // world - 1), np.concatenate(
            [s.epoch_indices(e) for e in range(4)])[: 4 * n // world - 1])
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(n, 2, world)


def test_two_ranks_of_the_loader_split_one_epoch(sets):
    src, tgt = prepared.load_prepared(sets["png"]), prepared.load_prepared(sets["tgt"])
    planners = [Planner(src, tgt, CROP, 2, rank, 2, seed=9) for rank in range(2)]
    seen = [i for p in planners for step in range(2) for i in p.source_plan(step).indices[:2]]
    assert sorted(seen) == list(range(8))  # 2 ranks x 2 steps x batch 2 = one epoch of 8 source images


def test_resume_at_a_step_continues_the_same_sequence(sets):
    fresh, resumed = make_loader(sets, "dali"), make_loader(sets, "dali", start_step=2)
    next(fresh), next(fresh)
    a, b = next(fresh), next(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _plant(sets, tmp_path, fmt: str, what: str, backend: str, **kw) -> tuple[object, str]:
    """A copy of the prepared source with one bad file in the first step's plan; (loader, its path)."""
    src = str(tmp_path / "src")
    shutil.copytree(sets[fmt], src)
    ds = prepared.load_prepared(src)
    planner = Planner(ds, prepared.load_prepared(sets["tgt"]), CROP, 2, seed=3, long_tail_classes=LONG_TAIL,
                      num_long_tail=2, flip=True, long_tail=prepared.load_prepared(ds.long_tail))  # make_loader's plan
    i = planner.source_plan(0).indices[0]
    path = ds.label_path(i) if what in ("missing label", "label size") else ds.image_path(i)
    if what == "truncated":  # header intact, entropy-coded data cut: only the decoder can notice
        data = open(path, "rb").read()
        open(path, "wb").write(data[: data.index(b"\xff\xda") + 40])
    elif what == "tail cut":  # only the last rows lost: a region decode above them would not notice
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) * 9 // 10])
    elif what == "garbage":
        open(path, "wb").write(os.urandom(500))
    elif what == "missing label":
        os.remove(path)
    else:
        Image.fromarray(np.zeros((40, 63), np.uint8), mode="L").save(path)
    return make_loader(sets, backend, fmt, source=src, num_threads=1, **kw), path


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("what", ["truncated", "tail cut", "garbage", "missing label", "label size"])
def test_bad_file_raises_an_error_naming_it(sets, tmp_path, backend, what):
    loader, path = _plant(sets, tmp_path, "jpeg", what, backend)
    try:
        with pytest.raises(DatasetError, match=path):
            next(loader)
    finally:
        loader.close()


# Sets held in memory (pixels.py): the same batches, the budget, the errors.

@pytest.mark.parametrize("workers", [0, 1])
def test_sets_held_in_memory_give_the_batches_read_from_files_bit_for_bit(sets, workers):
    files = make_loader(sets, "torch", num_threads=workers)
    held = make_loader(sets, "torch", num_threads=workers, cache_mib=100)
    try:
        assert files.in_memory == {k: files.in_memory[k] for k in ("source", "target", "long-tail")}
        assert "held" not in files.in_memory.values()
        assert set(held.in_memory.values()) == {"held"}
        for step in range(6):
            assert _same_batches(next(files), next(held)), step
    finally:
        files.close(), held.close()


def test_the_budget_holds_whole_sets_in_order(sets):
    from dsp_fast.pipelines.loader import held_in_memory
    from dsp_fast.pipelines.pixels import decoded_mib

    src, tgt = prepared.load_prepared(sets["png"]), prepared.load_prepared(sets["tgt"])
    lt = prepared.load_prepared(src.long_tail)
    assert decoded_mib(src, True) == len(src) * 64 * 40 * 4 / 2**20  # RGB and the label
    assert decoded_mib(tgt, False) == len(tgt) * 48 * 32 * 3 / 2**20  # the target's labels are not read
    sizes = {"source": (src, True), "target": (tgt, False), "long-tail": (lt, True)}
    mib = [decoded_mib(*v) for v in sizes.values()]
    got = held_in_memory(sizes, mib[0] + mib[1] / 2)  # the source, and half the target: not held, the next if it fits
    assert got["source"] == "held"
    assert got["target"] == f"{mib[1]:.1f} MiB decoded, {mib[1] / 2:.1f} MiB of the budget left"
    assert (got["long-tail"] == "held") == (mib[2] <= mib[1] / 2)
    assert set(held_in_memory(sizes, 0).values()) != {"held"} and "held" not in held_in_memory(sizes, 0).values()


def test_a_bad_file_of_a_held_set_is_named_when_the_loader_is_built(sets, tmp_path):
    with pytest.raises(DatasetError, match=f"^{tmp_path}/src/images/[^/]+\\.jpg: truncated file"):
        _plant(sets, tmp_path, "jpeg", "tail cut", "torch", cache_mib=100)


def test_dali_absent_names_the_gpu_extra(sets, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"\[gpu\]"):
        make_loader(sets, "dali")


def test_torchvision_backend_crops_like_torch(sets, monkeypatch):
    from dsp_fast.pipelines import torch_backend

    def fake_decode_jpeg(encoded, device):  # stands in for the GPU decoder: same interface, PIL underneath
        return [torch.from_numpy(np.array(torch_backend.decode(e.numpy(), "x", gray=False))).permute(2, 0, 1).to(device)
                for e in encoded]

    monkeypatch.setattr(torch_backend, "import_decode_jpeg", lambda: fake_decode_jpeg)
    a, b = next(make_loader(sets, "torchvision", "jpeg")), next(make_loader(sets, "torch", "jpeg"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["src_img"].is_contiguous(memory_format=torch.channels_last)


def test_unprepared_folder_and_bad_arguments_are_named(sets, tmp_path):
    with pytest.raises(DatasetError, match="no manifest; prepare the data first"):
        build_loaders(str(tmp_path), sets["tgt"], backend="torch")
    with pytest.raises(ValueError, match="data backend must be one of"):
        build_loaders(sets["png"], sets["tgt"], backend="pil")
    with pytest.raises(ValueError, match="crop 512x512 is larger"):
        build_loaders(sets["png"], sets["tgt"], backend="torch", crop_size=(512, 512))


def test_long_tail_sampler_matches_the_retry_loop(tmp_path):
    """Planner.draw_long_tail against the retry loop's law, P(image, window) uniform over the (image, window) pairs
    whose window holds the class, enumerated here by brute force on a tiny prepared set."""
    root, crop = str(tmp_path / "gta5"), (4, 4)
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(root, sub))
    layouts = [(slice(0, 1), slice(0, 1)), (slice(4, 6), slice(5, 7)), (slice(0, 10), slice(11, 12))]
    for i, (ys, xs) in enumerate(layouts):  # a pixel in a corner, a blob in the middle, a stripe at the edge
        ids = np.full((10, 12), 7, np.uint8)  # road
        ids[ys, xs] = 25  # rider: train id 12
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(os.path.join(root, "images", f"{i:05d}.png"))
        Image.fromarray(ids, mode="L").save(os.path.join(root, "labels", f"{i:05d}.png"))
    out = str(tmp_path / "prep")
    assert run_prepare(root, out, "--size", "12", "10", "--format", "png", "--long-tail-size", "12", "10",
                       "--crop", "4", "4") == 0
    src = prepared.load_prepared(out)
    lt = prepared.load_prepared(src.long_tail)
    planner = Planner(src, src, crop, 2, seed=0, long_tail_classes=(12,), num_long_tail=1, long_tail=lt)
    labels = [prepared.read_label_array(lt, i) for i in range(len(lt))]
    valid = [(i, y0, x0) for i, lb in enumerate(labels) for y0 in range(7) for x0 in range(9)
             if (lb[y0:y0 + 4, x0:x0 + 4] == 12).any()]
    assert len(valid) == 1 + 25 + 7  # 1 window, 5 x 5 windows, 7 windows
    n, got = 3300, {}
    rng = np.random.default_rng(0)
    for _ in range(n):
        i, (y0, x0) = planner.draw_long_tail(rng, 12)
        got[(i, y0, x0)] = got.get((i, y0, x0), 0) + 1
    assert set(got) <= set(valid)
    # TV over 33 cells of p = 1/33 with n = 3300: expected 0.5 * 33 * sqrt(p(1-p)/n) * sqrt(2/pi) = 0.036;
    # drawing the image uniformly instead of by its window count would give 0.55
    tv = 0.5 * sum(abs(got.get(k, 0) / n - 1 / len(valid)) for k in valid)
    assert tv < 0.07, tv
    plan = planner.long_tail_plan(5)  # B = 2 crops of the one class, image-major
    assert plan.classes == [12] and len(plan.indices) == len(plan.windows) == 2


def _roi_set(root: str, size: tuple[int, int], n: int, seed: int) -> prepared.PreparedSet:
    """n images and labels of `size` (w, h) written with preparation's own encoders (JPEG q95 4:4:4, gray PNG):
    smooth gradients, sharp-edged blocks and noise, so every 8x8 block has AC coefficients and colour edges."""
    from dsp_fast.prepare import encode_image, encode_label

    (w, h), rng, stems = size, np.random.default_rng(seed), [f"{i:03d}" for i in range(n)]
    os.makedirs(os.path.join(root, "images")), os.makedirs(os.path.join(root, "labels"))
    yy, xx = np.mgrid[:h, :w]
    for stem in stems:
        img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.float32)
        ids = rng.integers(0, 19, (h // 7 + 1, w // 5 + 1)).repeat(7, 0).repeat(5, 1)[:h, :w].astype(np.uint8)
        img = np.clip(0.5 * img + 6.0 * ids[..., None] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        with open(prepared.image_path(root, stem, "jpeg"), "wb") as f:
            f.write(encode_image(img, "jpeg", 95))
        with open(prepared.label_path(root, stem), "wb") as f:
            f.write(encode_label(ids))
    return prepared.PreparedSet(root, size, "jpeg", 19, stems, True, size, None, [], None)


@pytest.mark.parametrize("size, crop, offsets", [((333, 217), (61, 45), (0, 1, 7, 8, 9, 15, 17)),
                                                  ((1920, 1080), (512, 512), (0, 9, 16))])
def test_dali_roi_decode_is_the_full_decode_then_slice_bit_for_bit(tmp_path, size, crop, offsets):
    """fn.decoders.image_slice (what the DALI backend runs) against fn.decoders.image + fn.slice (what it ran before)
    and against PIL's full decode sliced with numpy, over windows at every corner and edge, at odd offsets on both
    sides of 8x8 block boundaries, and at random: tolerance 0 (both CPU decoders are libjpeg-turbo; a region decode
    that differed at block or upsampling boundaries would show here). Odd image and crop sizes in the first case,
    the long-tail size in the second."""
    from dsp_fast.pipelines.dali_backend import DaliCropStream
    from dsp_fast.pipelines.plan import CropPlan

    ds = _roi_set(str(tmp_path / "set"), size, 3, seed=len(offsets))
    (w, h), (cw, ch), per_step = size, crop, 8
    ys, xs = [*offsets, h - ch - 1, h - ch], [*offsets, w - cw - 1, w - cw]
    fixed = [(y, x) for y in ys for x in xs]  # every pair: corners, edges, odd offsets around block boundaries
    steps = -(-len(fixed) // per_step) + 1  # and a step of random windows at least

    def plan(step: int) -> CropPlan:  # a function of the step alone: both streams plan the same crops
        rng = np.random.default_rng([7, step])
        windows = fixed[step * per_step:(step + 1) * per_step]
        windows += [(int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)))
                    for _ in range(per_step - len(windows))]
        return CropPlan([(step + k) % len(ds) for k in range(per_step)], windows,
                        [bool(f) for f in rng.integers(0, 2, per_step)], [])

    streams = [DaliCropStream(ds, plan, crop, True, torch.device("cpu"), 1, prefetch=1, roi=roi)
               for roi in (True, False)]
    full = [(read(ds.image_path(i)), read(ds.label_path(i))) for i in range(len(ds))]
    for step in range(steps):
        (img, lab, p), (img_full, lab_full, p_full) = (next(s) for s in streams)
        assert p.windows == p_full.windows == plan(step).windows
        exp_img, exp_lab = [], []
        for i, (y0, x0), flip in zip(p.indices, p.windows, p.flips):
            cut = (slice(y0, y0 + ch), slice(x0, x0 + cw))
            a, b = full[i][0][cut], full[i][1][cut]
            exp_img.append(a[:, ::-1] if flip else a)
            exp_lab.append(b[:, ::-1] if flip else b)
        for got, whole, exp in ((img, img_full, exp_img), (lab, lab_full, exp_lab)):
            diff = (got.int() - whole.int()).abs()
            assert torch.equal(got, whole), f"step {step}: {int((diff > 0).sum())} values differ, max {int(diff.max())}"
            np.testing.assert_array_equal(got.numpy(), np.stack(exp))


# The producer thread (producer.py): the same batches, the errors, the shutdown.

def _same_batches(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # uint8 crops, int ids: tolerance 0


@pytest.mark.parametrize("workers", [0, 1])
def test_producer_gives_the_batches_read_on_demand_bit_for_bit(sets, workers):
    """With the thread reading ahead (over the main process's reads or a DataLoader worker's), every step's crops,
    labels and long-tail classes are those read when asked, for the same seed."""
    plain = make_loader(sets, "torch", num_threads=workers)
    ahead = make_loader(sets, "torch", num_threads=workers, producer=2)
    try:
        assert ahead._producer is not None and plain._producer is None
        for step in range(6):
            assert _same_batches(next(plain), next(ahead)), step
            assert ahead.planner.long_tail_plan(step) == plain.planner.long_tail_plan(step)
    finally:
        plain.close(), ahead.close()


def test_the_trainer_ends_the_same_with_and_without_the_producer(synthetic_root, tmp_path):
    """Four steps of the fast trainer reading ahead and reading on demand: the same weights, momenta and choice
    generator, bit for bit (the same batches, and nothing else of the step depends on when they were read)."""
    from helpers_run import assert_same_state, quiet_args, read

    from dsp_fast import train  # after conftest's TRITON_INTERPRET

    ends = []
    for producer in (0, 2):
        out = str(tmp_path / f"producer{producer}")
        assert train.main(quiet_args(synthetic_root, out, 4, f"fast.data_producer={producer}")) == 0
        ends.append(read(os.path.join(out, "ckpt_00000004.pt")))
    assert_same_state(*ends)


def test_a_resume_loses_no_batch_read_ahead(sets):
    """The checkpoint holds the steps consumed; the batches the thread had read beyond them are read again by the
    resumed loader: steps 3.. follow steps 0..2 with none lost or skipped."""
    plain = make_loader(sets, "torch")
    expected = [next(plain) for _ in range(6)]
    plain.close()
    first = make_loader(sets, "torch", producer=2)
    got = [next(first) for _ in range(3)]
    deadline = time.monotonic() + 60
    while not first._producer._queue.full():  # steps 3 and 4 read but not consumed when the run stops
        assert time.monotonic() < deadline, "the producer never filled its queue"
        time.sleep(0.01)
    first.close()
    resumed = make_loader(sets, "torch", producer=2, start_step=3)
    got += [next(resumed) for _ in range(3)]
    resumed.close()
    assert all(_same_batches(a, b) for a, b in zip(expected, got))


def test_producer_error_reaches_the_step_that_reads_the_bad_file(sets, tmp_path):
    """A file first read at step 2, made garbage: steps 0 and 1 arrive, step 2's next() raises the DatasetError
    naming the file in the consumer's thread (no hang), and the thread is gone."""
    src = str(tmp_path / "src")
    shutil.copytree(sets["png"], src)
    loader = make_loader(sets, "torch", source=src, producer=2)
    plans = [loader.planner.source_plan(s).indices for s in range(3)]
    i = next(i for i in plans[2] if i not in plans[0] + plans[1])
    path = loader.planner.source.image_path(i)
    loader.close()
    open(path, "wb").write(os.urandom(500))
    loader = make_loader(sets, "torch", source=src, producer=2)
    try:
        next(loader), next(loader)
        with pytest.raises(DatasetError, match=path):
            next(loader)
        with pytest.raises(DatasetError, match=path):  # and again: the stream ended there
            next(loader)
        loader._producer._thread.join(30)
        assert not loader._producer._thread.is_alive()
    finally:
        loader.close()


def test_close_stops_the_producer_thread(sets):
    """close() with the thread blocked on a full queue: the thread ends within the join (it polls its stop flag
    every 0.1 s; the bound only catches a hang), and a later next() ends the iteration."""
    loader = make_loader(sets, "torch", producer=1)
    next(loader)
    deadline = time.monotonic() + 60
    while not loader._producer._queue.full():
        assert time.monotonic() < deadline, "the producer never filled its queue"
        time.sleep(0.01)
    loader.close()
    assert not loader._producer._thread.is_alive()
    with pytest.raises(StopIteration):
        next(loader)


_EXIT_SCRIPT = """
import os, signal, sys
from dsp_fast.pipelines import build_loaders
how, workers = sys.argv[1], int(sys.argv[2])
loader = build_loaders({src!r}, {tgt!r}, crop_size={crop!r}, batch_size=2, backend="torch", producer=2,
                       num_threads=workers)
next(loader)
if how == "raise":
    raise RuntimeError("the step failed")
if how == "sigint":  # KeyboardInterrupt in the main thread, with the interpreter's usual exit
    os.kill(os.getpid(), signal.SIGINT)
    signal.pause()
print("end of script", flush=True)  # "exit": the loader left open, the thread running
"""


@pytest.mark.parametrize("how, workers, rc", [("exit", 0, 0), ("exit", 1, 0), ("raise", 0, 1), ("sigint", 0, -2)])
def test_the_producer_never_holds_up_the_process_exit(sets, tmp_path, how, workers, rc):
    """A loader left open with its thread running (and its DataLoader worker, which ignores SIGTERM) is closed at
    exit; the process ends with its own status after a normal end, an exception or Ctrl-C (the subprocess timeout
    only catches a hang)."""
    script = tmp_path / "run.py"
    script.write_text(_EXIT_SCRIPT.format(src=sets["png"], tgt=sets["tgt"], crop=CROP))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, str(script), how, str(workers)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == rc, out.stderr
    assert ("the step failed" in out.stderr) == (how == "raise")
    assert "terminate called" not in out.stderr  # a thread alive during finalization aborts the process
