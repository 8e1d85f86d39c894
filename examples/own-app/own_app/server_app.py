"""The ServerApp: a fedvb strategy built for the app's own model, evaluated by the app's own function."""

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch.nn.utils import vector_to_parameters

from fedvb.metrics import score
from fedvb.records import from_array_record
from fedvb.strategies import for_model
from own_app.task import NUM_CLIENTS, SmallCNN, client_data, test_data

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(0)
    model = SmallCNN()  # the architecture, and the starting weights of the server's mean
    x_test, y_test = test_data()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """fedvb's metrics (accuracy, NLL, ECE, Brier) of the server's mean on the app's test set."""
        vector_to_parameters(from_array_record(arrays)["mean"].float(), model.parameters())
        with torch.no_grad():
            metrics = score(model(x_test).softmax(-1), y_test, "classification")
        print(f"own-app round {server_round}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return MetricRecord(metrics)

    strategy = for_model(
        str(context.run_config["strategy"]), model, num_clients=NUM_CLIENTS,
        client_sizes={k: len(client_data(k)[1]) for k in range(NUM_CLIENTS)},
        # this app's setting for its small CNN (keys left out take the strategy's defaults, tuned for the papers'
        # MLPs: fedvb run --help)
        lr=0.01, local_epochs=2, batch_size=16, ivon_beta2=0.999, ivon_hess_init=0.1, prior_precision=1.0,
        temperature=1.0, rho=1.0, damping=1.0,
    )  # fmt: skip
    strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(),
                   num_rounds=int(context.run_config["num-server-rounds"]), evaluate_fn=evaluate)  # fmt: skip
