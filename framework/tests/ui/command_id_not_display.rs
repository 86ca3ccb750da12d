use factum::Command;

struct AccountId;

#[derive(Command)]
struct Deposit {
    #[command(id)]
    account: AccountId,
}

fn main() {}
