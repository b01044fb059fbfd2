"""python -m evaluator REF.npz SAMPLE.npz: ADM's evaluator (guided-diffusion/evaluations) without TensorFlow.

Errors a user causes (a missing or malformed .npz, missing Inception weights, too few samples for FID) end in one
line, as in every script (utils/cli.py); `--debug` shows the traceback."""
import json

from evaluator.evaluation import PRECISION_RECALL_K, evaluate
from evaluator.npz import NpzImages
from utils.cli import Script, file_to_write, flag_parser, positive_int, run, torch_device
from utils.files import atomic_open

FLAGS = flag_parser()
FLAGS.add_argument("ref_batch", help="reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz")
FLAGS.add_argument("sample_batch", help="sample batch .npz with arr_0 uint8 (N, H, W, 3)")
FLAGS.add_argument("--batch-size", type=positive_int, default=64, help="images per Inception forward pass")
FLAGS.add_argument("--device", type=torch_device, default=None,
                   help="torch device (default: cuda if available, else cpu)")
FLAGS.add_argument("--inception-weights", default=None,
                   help="path to weights-inception-2015-12-05-6726825d.pth (default: torch hub cache)")
FLAGS.add_argument("--allow-few-samples", action="store_true",
                   help="compute FID / sFID even over fewer images than feature dimensions (2048 / 2023)")
FLAGS.add_argument("--json", type=file_to_write, default=None, help="also write the results to this JSON file")

SCRIPT = Script(
    usage="python -m evaluator REF.npz SAMPLE.npz [--batch-size 64] [--device cuda] [--inception-weights PATH] "
          "[--allow-few-samples] [--json OUT]",
    summary="ADM's evaluator (guided-diffusion/evaluations) without TensorFlow: Inception Score, FID, sFID, "
            "precision and recall of SAMPLE.npz against REF.npz.",
    example="python -m evaluator VIRTUAL_imagenet256_labeled.npz runs/samples/rear_s.npz --json rear_s.json",
    flags=FLAGS,
    takes_config=False,
)


def score(config, args):
    results = evaluate(args.ref_batch, args.sample_batch, args.batch_size, args.device, args.inception_weights,
                       args.allow_few_samples)
    counts = {"reference_images": len(NpzImages(args.ref_batch)), "sample_images": len(NpzImages(args.sample_batch))}
    for name, value in results.items():
        print(f"{name}: {value}")
    print(f"(precision / recall: k = {PRECISION_RECALL_K} nearest neighbours, {counts['reference_images']} reference "
          f"and {counts['sample_images']} sample images)")
    if args.json:
        with atomic_open(args.json) as f:
            json.dump({**results, "precision_recall": {"k": PRECISION_RECALL_K, **counts}}, f, indent=2)
    return results


def main(argv=None):
    run(SCRIPT, score, argv)


if __name__ == "__main__":
    main()
