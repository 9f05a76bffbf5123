//! The one look of every table choreoctl prints for people: upper-case headings, no borders, two spaces
//! between columns, figures aligned on the right. Scripts read `--json`, never this.

use comfy_table::{Cell, CellAlignment, Row, Table, TableStyle};

/// Spaces after each column: wide enough to tell columns apart without rules.
const GAP: u16 = 2;

/// An empty table with `headings` (none: no heading row).
pub fn new(headings: &[&str]) -> Table {
    let mut table = Table::new();
    // Without comfy-table's tty feature there is no terminal width to fit: each column is as wide as its
    // widest cell, on a terminal or in a pipe alike.
    table.load_style(TableStyle::new());
    if !headings.is_empty() {
        table.set_header(headings.iter().copied());
    }
    table
}

/// A row of cells. Where a value is unknown, callers write `-`, so that the eye finds every column.
pub fn row<I, T>(cells: I) -> Row
where
    I: IntoIterator<Item = T>,
    T: ToString,
{
    Row::from(cells.into_iter().map(Cell::new))
}

/// The table as text, the columns listed in `figures` (by index) aligned on the right. Styled here, once
/// every row is in, since comfy-table creates a column when a row first reaches it.
pub fn render(table: &mut Table, figures: &[usize]) -> String {
    for (index, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, GAP));
        if figures.contains(&index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    // The last column's padding would leave trailing spaces.
    table.trim_fmt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_figures_align_right() {
        let mut t = new(&["SERVICE", "UNPUBLISHED", "NOTE"]);
        t.add_row(row(["order", "7", "fine"]));
        t.add_row(row(["inventory", "1234", "-"]));
        assert_eq!(
            render(&mut t, &[1]),
            "SERVICE    UNPUBLISHED  NOTE\n\
             order                7  fine\n\
             inventory         1234  -"
        );
    }

    #[test]
    fn a_table_without_headings_has_no_heading_row() {
        let mut t = new(&[]);
        t.add_row(row(["confirmed", "16"]));
        t.add_row(row(["wall time", "1.25 s"]));
        assert_eq!(render(&mut t, &[1]), "confirmed      16\nwall time  1.25 s");
    }
}
