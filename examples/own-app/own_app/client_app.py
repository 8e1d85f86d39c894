"""The ClientApp: the app's own data and model, fedvb's client step (fedvb.clients.api)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedvb.clients.api import partition_reply, train_reply
from own_app.task import SmallCNN, client_data

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return partition_reply(msg, context)  # tells the fedvb strategy which partition this node holds


@app.train()
def train(msg: Message, context: Context) -> Message:
    x, y = client_data(int(context.node_config["partition-id"]))
    return train_reply(msg, context, SmallCNN(), x, y)
