"""The demo: starts the extractor, shows its models, names what is in a few photos, then embeds
fashion200 (Fashion-MNIST, 10 classes x 20) at efficientnet_lite0's 8 featured layers in one
stream and prints each layer's mean search score (cosine), the way ConvNet Playground compared
layers.
"""

import io

import numpy as np
import torchvision
from PIL import Image
from skimage import data as skdata

from convsearch.channels import create_channel
from convsearch.datasets import encode_png, fashion_mnist_sample
from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.processes import start_service, stop_service
from convsearch.scoring import TOP, search_score
from convsearch.tensors import from_tensor

MODEL = "efficientnet_lite0"
IMAGENET = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def show_models(stub) -> list[str]:
    reply = stub.ListModels(pb.ListModelsRequest())
    print(f"{'model':20} {'input':>5} {'params':>12}  weights")
    for model in reply.models:
        state = "pretrained" if model.pretrained else (
            "random (dev)" if model.available else "missing: " + model.weights_path)
        print(f"{model.name:20} {model.input_size:>5} {model.parameter_count:>12,}  {state}")
    lite0 = next(m for m in reply.models if m.name == MODEL)
    return [layer.name for layer in lite0.layers if layer.featured]


def name_photos(stub) -> None:
    print("\nwhat efficientnet_lite0 sees (its ImageNet output layer '_fc'):")
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        buffer = io.BytesIO()
        Image.fromarray(getattr(skdata, name)()).save(buffer, format="JPEG")
        reply = stub.Embed(pb.EmbedRequest(config=pb.EmbedConfig(model=MODEL, layers=["_fc"]),
                                           images=[buffer.getvalue()]))
        logits = from_tensor(reply.layers[0].vectors)[0]
        top = ", ".join(IMAGENET[i] for i in np.argsort(-logits)[:3])
        print(f"  {name:10} -> {top}")


def layer_scores(stub, layers: list[str]) -> dict[str, float]:
    sample = fashion_mnist_sample(per_class=20)
    labels = np.array([label for _, label, _ in sample])

    def requests():
        yield pb.BulkEmbedRequest(config=pb.EmbedConfig(model=MODEL, layers=layers, normalize=True))
        for start in range(0, len(sample), 25):
            yield pb.BulkEmbedRequest(images=[pb.ImageInput(id=item_id, data=encode_png(pixels))
                                              for item_id, _, pixels in sample[start:start + 25]])

    vectors = {layer: [] for layer in layers}
    for answer in stub.BulkEmbed(requests()):
        for entry in answer.vectors.layers:
            vectors[entry.layer].append(from_tensor(entry.vector))
    scores = {}
    for layer in layers:
        unit = np.stack(vectors[layer])
        distance = 1.0 - unit @ unit.T
        np.fill_diagonal(distance, np.inf)
        ranked = np.argsort(distance, axis=1)[:, :TOP]
        scores[layer] = float(np.mean([search_score(labels[q], labels[ranked[q]])
                                       for q in range(len(labels))]))
    return scores


def main() -> None:
    print("starting the extractor ...", flush=True)
    process, address = start_service("convsearch-extractor", "--metrics-port", "-1",
                                     service="convsearch.extractor.v1.ExtractorService")
    try:
        stub = extractor_pb2_grpc.ExtractorServiceStub(create_channel(address))
        print(f"extractor serving at {address}\n")
        layers = show_models(stub)
        name_photos(stub)
        print(f"\nfashion200 search score per {MODEL} featured layer (cosine, top {TOP}):")
        scores = layer_scores(stub, layers)
        for layer, score in scores.items():
            print(f"  {layer:28} {score:6.2f}%  {'#' * round(score / 2)}")
        best = max(scores, key=scores.get)
        print(f"best layer: {best} ({scores[best]:.2f}%)")
    finally:
        stop_service(process)


if __name__ == "__main__":
    main()
