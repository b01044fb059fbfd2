"""python -m evaluator REF.npz SAMPLE.npz: ADM's evaluator (guided-diffusion/evaluations) without TensorFlow."""
import argparse
import json
import sys

from evaluator.evaluation import PRECISION_RECALL_K, evaluate
from evaluator.npz import NpzImages
from utils.cli import debug_requested, report
from utils.errors import UsageError, UserError


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m evaluator", description="ADM's evaluator (guided-diffusion/evaluations) without TensorFlow."
    )
    parser.add_argument("ref_batch", help="reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("sample_batch", help="sample batch .npz with arr_0 uint8 (N, H, W, 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception forward pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--inception-weights", default=None,
                        help="path to weights-inception-2015-12-05-6726825d.pth (default: torch hub cache)")
    parser.add_argument("--allow-few-samples", action="store_true",
                        help="compute FID / sFID even over fewer images than feature dimensions (2048 / 2023)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        results = evaluate(args.ref_batch, args.sample_batch, args.batch_size, args.device, args.inception_weights,
                           args.allow_few_samples)
    except (UserError, FileNotFoundError, ValueError) as error:  # bad input: one line (ValueError: the npz checks)
        if debug_requested(argv):
            raise
        raise SystemExit(report(error if isinstance(error, UserError) else UsageError(str(error)))) from None
    counts = {"reference_images": len(NpzImages(args.ref_batch)), "sample_images": len(NpzImages(args.sample_batch))}
    for name, value in results.items():
        print(f"{name}: {value}")
    print(f"(precision / recall: k = {PRECISION_RECALL_K} nearest neighbours, {counts['reference_images']} reference "
          f"and {counts['sample_images']} sample images)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**results, "precision_recall": {"k": PRECISION_RECALL_K, **counts}}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
