"""Write demo/photos/LABEL.jpg: one synthetic photo per class for the README's curl lines.

Photos come from make_demo's drawing with seed 7 (used by nothing else). For each class the first
photo the committed demo bundle labels correctly with a score above 0.9 is kept, so the README
shows a typical confident answer; the bundle's honest accuracy is measured on fresh sets (see the
README and tests/integration/test_demo_bundle.py), not on these.

    python demo/pick_photos.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

DEMO = Path(__file__).resolve().parent
sys.path.insert(0, str(DEMO))
sys.path.insert(0, str(DEMO.parent))

import make_demo  # noqa: E402

from edge_agent.engine.classifier import load_classifier  # noqa: E402
from edge_bundle.bundle import open_bundle  # noqa: E402
from edge_bundle.profiles import load_profile  # noqa: E402
from edge_bundle.signing import TrustStore  # noqa: E402

SEED = 7


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        bundle = open_bundle(
            DEMO / "bundle" / "defects-1.bundle",
            TrustStore.from_files([DEMO / "keys" / "demo.pub"]),
            Path(tmp) / "staging",
        )
        classifier = load_classifier(
            bundle, load_profile("generic-x86-64-avx2"), Path(tmp) / "cache"
        )
        (DEMO / "photos").mkdir(exist_ok=True)
        for label_index, label in enumerate(make_demo.LABELS):
            for index in range(50):
                data = make_demo.seeded_photo(SEED, label_index, index)
                image = classifier.decode(data, max_pixels=50_000_000, max_bytes=32 << 20)
                scored = classifier.postprocess(classifier.infer(classifier.prepare(image)), 1)
                if scored.label == label and scored.score > 0.9:
                    (DEMO / "photos" / f"{label}.jpg").write_bytes(data)
                    print(f"{label}: photo {index}, score {scored.score:.3f}")
                    break
            else:
                print(f"{label}: no confident photo among 50", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
