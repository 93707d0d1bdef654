"""The throughput comparison's outputs besides the JSON: a text summary and a bar chart."""

from __future__ import annotations

from bench.provenance import bar_chart


def write_chart(result: dict, path: str) -> None:
    """One bar per trainer and ablation variant (images/s); an n/a ablation as a stub with its reason."""
    t, env, cfg, method = result["trainers"], result["env"], result["config"], result["method"]
    bars = [("reference", t["reference"]["images_per_s"], "", "grey"),
            ("fast", t["fast"]["images_per_s"], f"x{result['headline']['fast_over_reference']:.2f} vs reference",
             "steelblue")]
    for a in result["ablation"]:
        if a["status"] == "measured":
            bars.append((a["label"], a["variant"]["images_per_s"], f"fast/this x{a['fast_over_variant']:.2f} (same "
                         "rounds)", "orange"))
        else:
            bars.append((f"{a['key']} off", None, a["reason"].split(":")[0], "lightgrey"))
    bars = [(label, v, f"{v:.2f} img/s {note}" if v else note, c) for label, v, note, c in bars]
    bar_chart(path, [f"DSP training images/s (3 x batch crops per step): {env['device']}  |  git "
                     f"{str(env['git_sha'])[:10]}  |  {env['date'][:10]}",
                     f"{cfg['arch']}, crop {cfg['crop'][0]}x{cfg['crop'][1]}, batch {cfg['batch']}+{cfg['batch']}, "
                     f"data {cfg['data']}; median of {method['rounds']} rounds x {method['steps_per_round']} steps"
                     f"{' (SMOKE)' if method['smoke'] else ''}"], bars)


def _fmt(v: float | None, spec: str, width: int = 0) -> str:
    return f"{'-' if v is None else format(v, spec):>{width}}"


def print_summary(result: dict) -> None:
    env, fl, rate, h, s = result["env"], result["flops"], result["matmul_rate"], result["headline"], result["scaling"]
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  DALI {env['dali']}  git {env['git_sha']}")
    print(f"FLOPs per step (assumed): {fl['step'] / 1e9:.3f} GFLOP = {fl['formula']}, F = "
          f"{fl['forward_per_image'] / 1e9:.3f}, FB = {fl['forward_backward_per_image'] / 1e9:.3f} GFLOP per image "
          f"({fl['arch']}, crop {fl['crop']}, B = {fl['batch']}); matmul rate {rate['flops_per_s'] / 1e12:.3f} "
          f"TFLOP/s {rate['dtype']} (measured)")
    print(f"{'trainer':<30}{'img/s':>9}{'steps/s':>9}{'ms/step':>9}{'data ms':>9}{'compute':>9}{'peak GiB':>9}"
          f"{'MFU':>8}")
    for name, t in result["trainers"].items():
        print(f"{name:<30}{t['images_per_s']:9.2f}{t['steps_per_s']:9.2f}{t['ms_per_step']:9.1f}{t['data_ms']:9.1f}"
              f"{t['compute_ms']:9.1f}{_fmt(t['peak_gib'], '.2f', 9)}{100 * t['mfu']:7.2f}%")
    print(f"fast / reference: x{h['fast_over_reference']:.2f} (median of per-round ratios "
          f"{', '.join(f'{r:.2f}' for r in h['per_round'])})")
    for a in result["ablation"]:
        if a["status"] == "measured":
            print(f"  ablation {a['label']:<28}{a['variant']['images_per_s']:9.2f} img/s vs fast "
                  f"{a['fast_same_rounds']['images_per_s']:.2f}: fast/this x{a['fast_over_variant']:.2f}, share of "
                  f"log gain {_fmt(a['share_of_log_gain'], '.2f')}")
        else:
            print(f"  ablation {a['key']:<28}{a['reason']}")
    if s["status"] != "measured":
        print(f"scaling: {s['status']} {s.get('reason', '')}")
        return
    print(f"scaling ({s['backend']}, {s['threads_per_process']} thread(s)/process): 1 process, global batch "
          f"{s['runs']['1']['global_batch']}: {s['runs']['1']['images_per_s']:.2f} img/s")
    for key, what in (("strong", "same global batch"), ("weak", "same batch per process")):
        r = s["runs"][key]
        print(f"  {key} ({what}): {s['processes']} processes, global batch {r['global_batch']}: "
              f"{r['images_per_s']:.2f} img/s, efficiency {100 * s[f'{key}_efficiency']:.0f}%")
