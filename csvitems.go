package batch

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/url"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/tidwall/gjson"
)

// A text/csv body is a bulk batch: its header row names the columns, and
// each record after it becomes one item, a JSON object of strings keyed by
// those names in their order. It is read as it comes, one record in
// memory at a time, so that the same reader serves a sync batch (collect
// the items) and a job streamed into storage (store each as it comes).

// Bounds of a CSV body.
const (
	defaultCSVColumns = 1000 // columns of the header, and fields of any record
	maxCSVName        = 256  // bytes of a header name
)

// csvLimits bound what a CSV body may hold.
type csvLimits struct {
	// maxRecord bounds the bytes of one record, the header row included,
	// and of the JSON object it becomes: max_body_size, as an NDJSON line.
	// It must be positive.
	maxRecord int64
	// maxColumns bounds the fields of any record; 0 means
	// defaultCSVColumns.
	maxColumns int
	// maxTotal bounds the bytes of all items together; 0 means none. Each
	// item repeats the header's names, so that items can be hundreds of
	// times the body's size: under a name of 256 control characters each
	// record "x\n", 2 bytes, is an item of 1,544.
	maxTotal int64
}

// readCSVItems reads a CSV body (RFC 4180, a header row first, LF or CRLF
// line ends; a UTF-8 BOM at the start is dropped; empty lines are skipped,
// as encoding/csv does, and a line of spaces is a record). It calls item
// with each data record as a JSON object, and fault with each fault found;
// line is the physical line where the record starts, the header's being 1
// unless empty lines come before it. obj is valid only until item returns:
// its array is reused. Either callback stops the reading by returning
// false, so that the caller caps faults and items as it needs.
//
// A record with the wrong number of fields, or too large as JSON, is a
// fault and the reading goes on, so that all of them are listed; item is
// still called with the good records after it. A bad header row (an empty,
// long or repeated name), a quote out of place, a record over
// lim.maxRecord bytes or lim.maxColumns fields stop it: past them the
// names, or where records begin, are a guess. So do items over
// lim.maxTotal bytes in all.
//
// records counts the data records read, each of which went to item or
// fault; a body with a header row and no records has no fault and 0
// records, and the caller decides what that is. A body with no header row
// at all is a fault. err is an error reading r, never a fault.
func readCSVItems(r io.Reader, lim csvLimits, item func(line int, obj []byte) bool, fault func(line int, msg string) bool) (records int, err error) {
	if lim.maxColumns <= 0 {
		lim.maxColumns = defaultCSVColumns
	}
	body, err := dropBOM(r)
	if err != nil {
		return 0, err
	}
	g := &csvGuard{r: body, lim: lim, line: 1, fields: 1}
	cr := csv.NewReader(g)
	cr.ReuseRecord = true // the first record sets FieldsPerRecord

	names, err := cr.Read()
	switch {
	case errors.Is(err, io.EOF):
		fault(1, "no header row: the body is empty")
		return 0, nil
	case err != nil:
		line, msg, ok := csvFault(err)
		if !ok {
			return 0, err
		}
		fault(line, "header row: "+msg)
		return 0, nil
	}
	line, _ := cr.FieldPos(0)
	keys, ok := csvKeys(names, line, fault)
	if !ok {
		return 0, nil
	}

	var obj []byte
	var total int64
	var pe *csv.ParseError // out of the loop: errors.As moves it to the heap
	for {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			return records, nil
		}
		records++
		switch {
		case errors.As(err, &pe) && errors.Is(pe.Err, csv.ErrFieldCount):
			msg := fmt.Sprintf("%d fields, where the header has %d", len(rec), len(keys))
			if len(rec) == 1 {
				msg = fmt.Sprintf("1 field, where the header has %d", len(keys))
			}
			if !fault(pe.StartLine, msg) {
				return records, nil
			}
			continue
		case err != nil:
			line, msg, ok := csvFault(err)
			if !ok {
				return records - 1, err
			}
			fault(line, msg)
			return records, nil
		}
		line, _ := cr.FieldPos(0)
		var fits bool
		if obj, fits = appendCSVObject(obj[:0], keys, rec, lim.maxRecord); !fits {
			if !fault(line, fmt.Sprintf("record is larger than max_body_size (%d bytes) as JSON", lim.maxRecord)) {
				return records, nil
			}
			continue
		}
		if total += int64(len(obj)); lim.maxTotal > 0 && total > lim.maxTotal {
			fault(line, fmt.Sprintf("the items are larger than %d bytes as JSON in all; the rest is not read", lim.maxTotal))
			return records, nil
		}
		if !item(line, obj) {
			return records, nil
		}
	}
}

// csvKeys checks the header row's names and returns each as the start of a
// JSON member, `"name":`. Names are compared as JSON will read them, each
// invalid byte a U+FFFD, so that no two keys of an object are one.
func csvKeys(names []string, line int, fault func(line int, msg string) bool) ([][]byte, bool) {
	keys := make([][]byte, len(names))
	seen := make(map[string]int, len(names))
	ok := true
	for i, name := range names {
		var msg string
		switch {
		case name == "":
			msg = fmt.Sprintf("column %d has no name", i+1)
		case len(name) > maxCSVName:
			msg = fmt.Sprintf("the name of column %d is longer than %d bytes", i+1, maxCSVName)
		default:
			norm := string([]rune(name)) // as jsontext.AppendString writes it
			if j, dup := seen[norm]; dup {
				msg = fmt.Sprintf("column %d has the name of column %d, %s", i+1, j+1, jsontext.AppendString(nil, short(norm)))
			} else {
				seen[norm] = i
			}
		}
		if msg != "" {
			ok = false
			if !fault(line, "header row: "+msg) {
				return nil, false
			}
			continue
		}
		keys[i] = append(jsontext.AppendString(nil, name), ':')
	}
	return keys, ok
}

// appendCSVObject appends the JSON object of a record. It reports false,
// having appended at most limit bytes, when the object would be longer:
// escaping can make a cell six times its size, and the buffer must not.
func appendCSVObject(dst []byte, keys [][]byte, rec []string, limit int64) ([]byte, bool) {
	start := len(dst)
	dst = append(dst, '{')
	for i, cell := range rec {
		// The key, the closing brace and the comma before; a cell of n
		// bytes is at most 6n+2 as a JSON string.
		need := int64(len(keys[i]) + 1)
		if i > 0 {
			need++
		}
		if size := int64(len(dst) - start); size+need+6*int64(len(cell))+2 > limit &&
			size+need+int64(jsonStringLen(cell)) > limit {
			return dst, false
		}
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, keys[i]...)
		dst = jsontext.AppendString(dst, cell)
	}
	return append(dst, '}'), true
}

// jsonStringLen is len(jsontext.AppendString(nil, s)), without writing it.
func jsonStringLen(s string) int {
	n := 2
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c >= 0x20 && c != '"' && c != '\\':
				n++
			case c == '"', c == '\\', c == '\n', c == '\r', c == '\t':
				n += 2
			default:
				n += 6
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			n += 6
		} else {
			n += size
		}
		i += size
	}
	return n
}

// csvFault turns an error of csv.Reader.Read into a fault that stops the
// reading, with the line where its record starts; ok is false for an
// error reading the body.
func csvFault(err error) (line int, msg string, ok bool) {
	var pe *csv.ParseError
	var le *csvLimitError
	switch {
	case errors.As(err, &le):
		return le.line, le.msg + "; the rest is not read", true
	case errors.As(err, &pe):
		at := fmt.Sprintf("column %d", pe.Column)
		if pe.Line != pe.StartLine {
			at = fmt.Sprintf("line %d, column %d", pe.Line, pe.Column)
		}
		what := `a quoted field not closed, or a " in it not doubled`
		if errors.Is(pe.Err, csv.ErrBareQuote) {
			what = `a " in a field that is not quoted`
		}
		return pe.StartLine, what + ", at " + at + "; the rest is not read", true
	}
	return 0, "", false
}

var utf8BOM = []byte{0xef, 0xbb, 0xbf}

// dropBOM returns r without the UTF-8 BOM it may start with.
func dropBOM(r io.Reader) (io.Reader, error) {
	var head [3]byte
	n, err := io.ReadFull(r, head[:])
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, err
	}
	if bytes.Equal(head[:n], utf8BOM) {
		n = 0
	}
	return io.MultiReader(bytes.NewReader(head[:n]), r), nil
}

// csvGuard passes a CSV body to csv.Reader and stops it at the first record
// over the limits, before the reader holds it: csv.Reader keeps a whole
// record, and 24 bytes for each field, so that a 1 GiB quoted field, or a
// line of ten million commas, would otherwise be held whole. It follows
// quotes as a toggle, which is where csv.Reader sees them in every body it
// accepts; once csv.Reader finds a quote out of place, the reading stops.
type csvGuard struct {
	r      io.Reader
	lim    csvLimits
	quoted bool
	size   int64 // bytes of the record being read
	fields int   // of the record being read
	line   int   // physical line being read
	start  int   // where the record being read starts
	err    error // the limit passed, once the bytes before it are passed on
}

// csvLimitError is a record over the limits: a fault, at line.
type csvLimitError struct {
	line int
	msg  string
}

func (e *csvLimitError) Error() string { return fmt.Sprintf("line %d: %s", e.line, e.msg) }

func (g *csvGuard) Read(p []byte) (int, error) {
	if g.err != nil {
		return 0, g.err
	}
	n, err := g.r.Read(p)
	for i, c := range p[:n] {
		if g.size == 0 {
			g.start = g.line
		}
		g.size++
		switch c {
		case '"':
			g.quoted = !g.quoted
		case ',':
			if !g.quoted {
				g.fields++
			}
		case '\n':
			g.line++
			if !g.quoted {
				g.size, g.fields = 0, 1
				continue
			}
		}
		switch {
		case g.size > g.lim.maxRecord:
			g.err = &csvLimitError{g.start, fmt.Sprintf("record is longer than max_body_size (%d bytes)", g.lim.maxRecord)}
		case g.fields > g.lim.maxColumns:
			g.err = &csvLimitError{g.start, fmt.Sprintf("more than %d fields", g.lim.maxColumns)}
		default:
			continue
		}
		if i == 0 {
			return 0, g.err
		}
		return i, nil
	}
	return n, err
}

// A text/csv batch takes its operation from the query: method, path,
// key, body (a template: JSON, or else text) and any number of
// header=Name:value, with {{item.COLUMN}} for the row's fields; without
// a body template each row, an object of strings, is the body. And the
// batch options mode, atomicity, max_attempts, key_concurrency,
// omit_response_on_success, include_headers, dry_run and async. Each row
// is an item, the body of its operation.

// isCSV reports whether a Content-Type is text/csv.
func isCSV(ct string) bool { return isMediaType(ct, "text/csv") }

// csvTemplate builds the bulk operation, and the envelope's options, of a
// CSV batch from its query. Values are quoted as JSON strings, but for
// options that are true, false or a whole number: the parser checks them
// as it checks a JSON batch's.
func csvTemplate(q url.Values) (op, opts []byte, faults badBatchError) {
	op = []byte(`{`)
	field := func(dst []byte, name, v string, raw bool) []byte {
		if len(dst) > 1 {
			dst = append(dst, ',')
		}
		dst = append(jsontext.AppendString(dst, name), ':')
		if raw && (v == "true" || v == "false" || gjson.Valid(v) && gjson.Parse(v).Type == gjson.Number) {
			return append(dst, v...)
		}
		return jsontext.AppendString(dst, v)
	}
	opts = []byte{'{'}
	var headers []byte
	for _, name := range slices.Sorted(maps.Keys(q)) {
		vs := q[name]
		if len(vs) > 1 && name != "header" && !strings.HasPrefix(name, metadataQueryPrefix) {
			faults = append(faults, fault{Index: -1, Message: fmt.Sprintf("query parameter %q given twice", short(name))})
			continue
		}
		switch name {
		case "method", "path", "key":
			op = field(op, name, vs[0], false)
		case "body": // a body template: JSON, or else text
			if problem, _ := jsontext.Check([]byte(vs[0]), maxJSONDepth); problem == "" {
				if len(op) > 1 {
					op = append(op, ',')
				}
				op = append(append(op, `"body":`...), vs[0]...)
			} else {
				op = field(op, name, vs[0], false)
			}
		case "header":
			for _, h := range vs {
				k, v, ok := strings.Cut(h, ":")
				if !ok {
					faults = append(faults, fault{Index: -1, Message: fmt.Sprintf("header=%s: write Name:value", short(h))})
					continue
				}
				if headers == nil {
					headers = []byte{'{'}
				}
				headers = field(headers, strings.TrimSpace(k), strings.TrimSpace(v), false)
			}
		case "mode", "atomicity":
			opts = field(opts, name, vs[0], false)
		case "max_attempts", "key_concurrency", "omit_response_on_success", "include_headers", "dry_run", "async",
			"max_failures", "max_failure_rate":
			opts = field(opts, name, vs[0], true)
		default:
			if strings.HasPrefix(name, metadataQueryPrefix) {
				continue // read whole, below
			}
			faults = append(faults, fault{Index: -1, Message: fmt.Sprintf("unknown query parameter %q: a CSV batch takes method, path, key, header and the batch options", short(name))})
		}
	}
	switch md, msg := queryMetadata(q); {
	case msg != "":
		faults = append(faults, fault{Index: -1, Message: msg})
	case md != nil:
		buf, _ := json.Marshal(md)
		if len(opts) > 1 {
			opts = append(opts, ',')
		}
		opts = append(append(opts, `"metadata":`...), buf...)
	}
	if headers != nil {
		op = append(append(append(op, `,"headers":`...), headers...), '}')
	}
	if len(op) == 1 {
		faults = append(faults, fault{Index: -1, Message: "a CSV batch needs its operation in the query: ?method=PATCH&path=/users/{{item.id}}"})
	}
	return append(op, '}'), opts, faults
}

// csvBatch reads a CSV body of a sync batch into the body of a native
// bulk batch, and the line of each item. A fault names the line where its
// record starts; nothing runs on any. More rows than lim.maxOps is an
// error of its own (413).
func csvBatch(r io.Reader, q url.Values, lim *rules, maxRecord int64) (body []byte, lines []int32, err error) {
	op, opts, faults := csvTemplate(q)
	if len(opts) == 1 {
		body = append(opts, `"operation":`...)
	} else {
		body = append(append(opts, ','), `"operation":`...)
	}
	body = append(append(body, op...), `,"items":[`...)
	n := 0
	_, rerr := readCSVItems(r, csvLimits{maxRecord: maxRecord, maxTotal: 4 * maxRecord}, func(line int, obj []byte) bool {
		if n++; n > lim.maxOps {
			return false
		}
		if n > 1 {
			body = append(body, ',')
		}
		body = append(body, obj...)
		lines = append(lines, int32(line))
		return true
	}, func(line int, msg string) bool {
		faults = append(faults, fault{Index: -1, Message: fmt.Sprintf("line %d: %s", line, msg)})
		return len(faults) < maxFaults
	})
	switch {
	case rerr != nil:
		return nil, nil, rerr
	case n > lim.maxOps:
		return nil, nil, fmt.Errorf("batch has more than the %d rows allowed (max_ops): send it async", lim.maxOps)
	case len(faults) > 0:
		return nil, nil, faults
	}
	return append(body, "]}"...), lines, nil
}

// atLines puts the line of each operation's item in front of its faults,
// and leaves the index: the client finds the row by its line.
func atLines(err error, lines []int32) error {
	var faults badBatchError
	if !errors.As(err, &faults) {
		return err
	}
	for k, f := range faults {
		if f.Index >= 0 && f.Index < len(lines) {
			faults[k].Message = fmt.Sprintf("line %d: %s", lines[f.Index], f.Message)
		}
	}
	return faults
}
