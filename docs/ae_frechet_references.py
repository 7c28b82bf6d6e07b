"""Reference points for the Fréchet distance of docs/experiments.md (autoencoder section).

    python docs/ae_frechet_references.py CLASSIFIER_CKPT

prints, in the feature space of a classifier trained with ``bsdgraph train`` (``bsdgraph/tools/frechet.py``), the Fréchet
distance between the Fashion-MNIST test images and (a) the first 10 000 training images (the floor: two samples of
the same distribution), (b) the test images averaged over 2x2 pixel blocks (a mild blur, with its MSE), (c) the
mean training image in place of every test image (no reconstruction at all).
"""

import sys

import torch
import torch.nn.functional as F

from bsdgraph.train.data import load_idx_dataset
from bsdgraph.tools.frechet import frechet_distance, load_feature_net


def main(classifier: str) -> None:
    ds = load_idx_dataset(None)
    test, train = ds.x_test.reshape(-1, 1, 28, 28), ds.x_train[:10000].reshape(-1, 1, 28, 28)
    net = load_feature_net(classifier, (1, 28, 28))
    ref = net.features(test)
    print(f"features: time-mean current into {net.layer}, {ref.shape[1]} values per image")
    print(f"FD(test, first 10000 train images) = {frechet_distance(ref, net.features(train)):.3f}")
    blur = F.avg_pool2d(test, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    print(f"FD(test, test averaged over 2x2 blocks) = {frechet_distance(ref, net.features(blur)):.3f} "
          f"(MSE {float(((blur - test) ** 2).mean()):.5f})")
    mean = train.mean(0, keepdim=True).expand_as(test)
    print(f"FD(test, the mean train image for every test image) = {frechet_distance(ref, net.features(mean)):.1f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    torch.set_num_threads(1)
    main(sys.argv[1])
