"""nnssl_probe: judge a pretrained encoder in minutes with a linear voxel probe on an nnU-Net task."""
from __future__ import annotations

import argparse

from nnssl.cli import setup_logging
from nnssl.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> int:
    from nnssl.probe.options import ProbeCases, ProbeSettings

    cases, settings = ProbeCases(dataset=""), ProbeSettings()
    parser = argparse.ArgumentParser(
        prog="nnssl_probe",
        description="Freeze an encoder, fit a linear voxel classifier (a 1x1x1 convolution over the upsampled, "
                    "concatenated features of the four Swin stages; cross-entropy + Dice, a fixed number of "
                    "seeded steps) on patches of the training cases of a fold of an nnU-Net-preprocessed task, and "
                    "report Dice per class on the fold's validation cases (sliding window at the plan's patch "
                    "size). The same probe of a randomly initialised encoder of the same preset is the baseline "
                    "printed beside it. Writes OUT/probe.json. A linear probe is a cheap proxy for what an "
                    "encoder offers; fine-tuning (nnUNetv2_train) measures what it is worth.")
    parser.add_argument("encoder", metavar="ENCODER",
                        help="an encoder file (encoder_final.pth), a pretraining run folder ($nnssl_results/<method>/"
                             "<run>), a method name (its newest finished run, or $nnssl_run's, as the fine-tuning "
                             "trainers choose; the teacher for DINO and iBOT), or 'random'")
    parser.add_argument("-d", dest="dataset", required=True, help="nnU-Net dataset id or name of the task, e.g. 3")
    parser.add_argument("--fold", type=int, default=cases.fold,
                        help=f"fold of splits_final.json: train on its training cases, evaluate on its validation "
                             f"cases (default {cases.fold})")
    parser.add_argument("--shots", type=int,
                        help="train on N of the fold's training cases, chosen as nnssl_fewshot --shots N --seed "
                             "SEED chooses them (default: all)")
    parser.add_argument("-o", dest="output", required=True, help="output folder for probe.json")
    parser.add_argument("-c", dest="configuration", default=cases.configuration,
                        help=f"nnU-Net configuration (default {cases.configuration})")
    parser.add_argument("-p", dest="plans", default=cases.plans, help=f"plans identifier (default {cases.plans})")
    parser.add_argument("--backbone", help="Swin preset of ENCODER 'random' (default: $nnssl_backbone, else paper)")
    parser.add_argument("--patches-per-case", type=int, default=cases.patches_per_case,
                        help=f"training patches cut from each training case, half centred on foreground "
                             f"(default {cases.patches_per_case})")
    parser.add_argument("--steps", type=int, default=settings.steps,
                        help=f"optimizer steps of the classifier (default {settings.steps})")
    parser.add_argument("--seed", type=int, default=settings.seed,
                        help=f"seed of the few-shot cases, patch positions, classifier and random encoder "
                             f"(default {settings.seed})")
    parser.add_argument("--random-from", metavar="PROBE_JSON",
                        help="take the random baseline from the probe.json of an 'nnssl_probe random' run with the "
                             "same task, options and preset instead of probing it again (nnssl_benchmark probes "
                             "random once per task this way)")
    parser.add_argument("-device", "--device", dest="device", choices=("cuda", "cpu", "mps"),
                        help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    setup_logging()
    with exit_on_user_error("nnssl_probe"):
        from nnssl.errors import NnsslError
        from nnssl.probe.run import run_probe, summary_line

        if args.steps < 1:
            raise NnsslError(f"--steps must be >= 1; got {args.steps}.")
        cases = ProbeCases(dataset=args.dataset, fold=args.fold, shots=args.shots, configuration=args.configuration,
                           plans=args.plans, patches_per_case=args.patches_per_case, seed=args.seed)
        settings = ProbeSettings(steps=args.steps, seed=args.seed)
        record = run_probe(args.encoder, cases, args.output, settings=settings,
                           backbone=args.backbone, device=args.device, random_from=args.random_from)
    print(summary_line(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
