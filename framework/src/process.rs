//! Process managers: react to events by issuing commands.
