use factum::Event;

#[derive(Event)]
#[event(prefix = "loan", renamed_from("library.loan"))]
enum LoanEvent {
    #[event(renamed_from("loan.lent"))]
    Lent,
    #[event(renamed_from("library.lent", 3))]
    Returned,
    #[event(renamed_from("loan.returned"))]
    Lost,
    #[event(renamed_from("library.lent"))]
    Found,
    #[event(renamed_from)]
    Renewed,
    #[event(renamed_from(""))]
    Extended,
    #[event(renamed_from("a"), renamed_from("b"))]
    Recalled,
}

fn main() {}
