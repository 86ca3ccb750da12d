use factum::Command;

#[derive(Command)]
struct Deposit {
    account: String,
    amount: u64,
}

#[derive(Command)]
enum AccountCommand {
    Open {
        #[command(id)]
        account: String,
    },
    Close {
        account: String,
    },
    Freeze,
}

#[derive(Command)]
#[command(id = account)]
enum Named {
    Open { account: String },
    Rename { id: String },
}

#[derive(Command)]
struct TwoIds {
    #[command(id)]
    a: String,
    #[command(id)]
    b: String,
}

fn main() {}
