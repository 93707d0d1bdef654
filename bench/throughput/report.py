"""The throughput comparison's outputs besides the JSON: a text summary and a PNG bar chart drawn with PIL
(matplotlib is not installed on the CPU machine)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

BAR_COLOURS = {"reference": (150, 150, 150), "fast": (40, 110, 200), "ablation": (230, 140, 40),
               "n/a": (200, 200, 200)}


def chart_rows(result: dict) -> list[tuple[str, float | None, str, str]]:
    """(label, images/s or None, colour key, note) per bar: reference, fast, then each ablation in order."""
    t = result["trainers"]
    ratio = result["headline"]["fast_over_reference"]
    rows = [("reference", t["reference"]["images_per_s"], "reference", ""),
            ("fast", t["fast"]["images_per_s"], "fast", f"x{ratio:.2f} vs reference")]
    for a in result["ablation"]:
        if a["status"] == "measured":
            v = a["variant"]["images_per_s"]
            ratio = a["fast_over_variant"]
            # *_on rows turn something on: their gain is this/fast; the ratios come from the same rounds
            on = a["key"].endswith("_on")
            note = f"{'this/fast' if on else 'fast/this'} x{1 / ratio if on else ratio:.2f} (same rounds)"
            rows.append((a["label"], v, "ablation", note))
        else:
            rows.append((f"{a['key']} off", None, "n/a", a["reason"].split(":")[0]))
    return rows


def write_chart(result: dict, path: str) -> None:
    rows = chart_rows(result)
    font = ImageFont.load_default()
    left, right, top, bar_h, gap = 230, 230, 70, 26, 10
    plot_w = 520
    width, height = left + plot_w + right, top + len(rows) * (bar_h + gap) + 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    env, cfg = result["env"], result["config"]
    title = (f"DSP training throughput: {env['device']}  |  git {str(env['git_sha'])[:10]}  |  {env['date'][:10]}")
    sub = (f"{cfg['arch']}, crop {cfg['crop'][0]}x{cfg['crop'][1]}, batch {cfg['batch']}+{cfg['batch']}, "
           f"data {cfg['data']}; median of {result['method']['rounds']} rounds x {result['method']['steps_per_round']}"
           f" steps{' (SMOKE)' if result['method']['smoke'] else ''}")
    d.text((10, 10), title, fill="black", font=font)
    d.text((10, 28), sub, fill=(60, 60, 60), font=font)
    vmax = max((v for _, v, _, _ in rows if v), default=1.0) * 1.05
    x0 = left
    for i, (label, value, colour, note) in enumerate(rows):
        y = top + i * (bar_h + gap)
        d.text((10, y + 8), label[:36], fill="black", font=font)
        if value is None:
            d.rectangle([x0, y, x0 + 4, y + bar_h], fill=BAR_COLOURS["n/a"])
            d.text((x0 + 10, y + 8), note or "n/a", fill=(110, 110, 110), font=font)
            continue
        w = int(plot_w * value / vmax)
        d.rectangle([x0, y, x0 + max(w, 1), y + bar_h], fill=BAR_COLOURS[colour])
        d.text((x0 + w + 6, y + 8), f"{value:.2f} img/s  {note}", fill="black", font=font)
    axis_y = top + len(rows) * (bar_h + gap)
    d.line([x0, top - 4, x0, axis_y], fill="black")
    d.line([x0, axis_y, x0 + plot_w, axis_y], fill="black")
    for k in range(5):
        v = vmax * k / 4
        x = x0 + int(plot_w * k / 4)
        d.line([x, axis_y, x, axis_y + 4], fill="black")
        d.text((x - 10, axis_y + 6), f"{v:.0f}" if vmax > 20 else f"{v:.1f}", fill="black", font=font)
    d.text((x0 + plot_w // 2 - 120, axis_y + 24), "training images/s (3 x batch crops per DSP step)", fill="black",
           font=font)
    img.save(path)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_summary(result: dict) -> None:
    env, fl, rate = result["env"], result["flops"], result["matmul_rate"]
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  DALI {env['dali']}  git {env['git_sha']}")
    print(f"FLOPs per step (assumed): {fl['step'] / 1e9:.3f} GFLOP = {fl['formula']}, F = "
          f"{fl['forward_per_image'] / 1e9:.3f}, FB = {fl['forward_backward_per_image'] / 1e9:.3f} GFLOP per image "
          f"({fl['arch']}, crop {fl['crop']}, B = {fl['batch']}); matmul rate {rate['flops_per_s'] / 1e12:.3f} "
          f"TFLOP/s {rate['dtype']} (measured)")
    print(f"{'trainer':<30}{'img/s':>9}{'steps/s':>9}{'ms/step':>9}{'data ms':>9}{'compute':>9}{'peak GiB':>9}"
          f"{'MFU':>8}")
    for name, t in result["trainers"].items():
        print(f"{name:<30}{t['images_per_s']:9.2f}{t['steps_per_s']:9.2f}{t['ms_per_step']:9.1f}{t['data_ms']:9.1f}"
              f"{t['compute_ms']:9.1f}{_fmt(t['peak_gib'], '9.2f')}{100 * t['mfu']:7.2f}%")
    h = result["headline"]
    print(f"fast / reference: x{h['fast_over_reference']:.2f} (median of per-round ratios "
          f"{', '.join(f'{r:.2f}' for r in h['per_round'])})")
    for a in result["ablation"]:
        if a["status"] == "measured":
            v, f = a["variant"], a["fast_same_rounds"]
            share = a.get("share_of_log_gain")
            print(f"  ablation {a['label']:<28}{v['images_per_s']:9.2f} img/s vs fast {f['images_per_s']:.2f}: "
                  f"fast/this x{a['fast_over_variant']:.2f} (this/fast x{1 / a['fast_over_variant']:.2f}), "
                  f"share of log gain {_fmt(share, '.2f')}")
        else:
            print(f"  ablation {a['key']:<28}{a['reason']}")
    s = result["scaling"]
    if s.get("status") == "measured":
        runs = s["runs"]
        n = s["processes"]
        print(f"scaling ({s['backend']}, {s['threads_per_process']} thread(s)/process): 1 process, global batch "
              f"{runs['1']['global_batch']}: {runs['1']['images_per_s']:.2f} img/s")
        for key, what in (("strong", "same global batch"), ("weak", "same batch per process")):
            r = runs[key]
            print(f"  {key} ({what}): {n} processes, global batch {r['global_batch']}: {r['images_per_s']:.2f} img/s, "
                  f"efficiency {100 * s[f'{key}_efficiency']:.0f}%")
    else:
        print(f"scaling: {s.get('status')} {s.get('reason', '')}")
