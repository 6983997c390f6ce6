"""Stand-in of VLMEvalKit's run.py (repository root, not part of the installed package): ``main()``
parses ``--data`` / ``--model`` / ``--work-dir``, builds each model from ``supported_VLM`` by name,
answers every row of each dataset one message at a time (``model.generate(message=..., dataset=...)``
as vlmeval.inference.infer_data), writes the prediction file and prints / stores the result of
``dataset.evaluate``."""
import argparse
import json
import os

from vlmeval.config import supported_VLM
from vlmeval.dataset import build_dataset
from vlmeval.smp import dump, get_pred_file_path, load_env  # noqa: F401


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=str, nargs="+")
    parser.add_argument("--model", type=str, nargs="+")
    parser.add_argument("--work-dir", type=str, default="./outputs")
    args = parser.parse_args()
    for model_name in args.model:
        model = supported_VLM[model_name]()
        pred_root = os.path.join(args.work_dir, model_name)
        os.makedirs(pred_root, exist_ok=True)
        for dataset_name in args.data:
            dataset = build_dataset(dataset_name)
            model.set_dump_image(dataset.dump_image)
            data = dataset.data.copy()
            data["prediction"] = [model.generate(message=dataset.build_prompt(data.iloc[i]), dataset=dataset_name)
                                  for i in range(len(data))]
            result_file = get_pred_file_path(pred_root, model_name, dataset_name)
            dump(data, result_file)
            result = dataset.evaluate(result_file, nproc=4, model="exact_matching")
            with open(os.path.join(pred_root, f"{model_name}_{dataset_name}_acc.json"), "w") as f:
                json.dump(result.to_dict(orient="records"), f)
            print(json.dumps(result.to_dict(orient="records")))


if __name__ == "__main__":
    load_env()
    main()
