"""python -m evaluator REF.npz SAMPLE.npz: ADM's evaluator (guided-diffusion/evaluations) without TensorFlow."""
import argparse
import json

from evaluator.evaluation import evaluate


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m evaluator", description="ADM's evaluator (guided-diffusion/evaluations) without TensorFlow."
    )
    parser.add_argument("ref_batch", help="reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("sample_batch", help="sample batch .npz with arr_0 uint8 (N, H, W, 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception forward pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--inception-weights", default=None,
                        help="path to weights-inception-2015-12-05-6726825d.pth (default: torch hub cache)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.ref_batch, args.sample_batch, args.batch_size, args.device, args.inception_weights)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for name, value in results.items():
        print(f"{name}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
