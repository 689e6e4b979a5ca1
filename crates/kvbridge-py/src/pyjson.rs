//! Python objects ↔ JSON without Python's `json` module: `kv_transfer_params` arrive as
//! the request's dict and are decoded here natively. A dict's few known keys are read
//! straight from it into the core's [`ReqParams`] (no JSON text in between); anything else
//! goes through JSON text, as before.
use kvbridge_core::params::{Field, ReqParams};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

/// Nesting beyond this is cut off (the value becomes a string): params are flat.
const MAX_DEPTH: u32 = 32;

fn to_value(obj: &Bound<'_, PyAny>, depth: u32) -> Value {
    // Type checks with `is_instance_of`/`downcast_exact` (no error object built on a miss):
    // this runs for every element of every request's params.
    if obj.is_none() {
        return Value::Null;
    }
    if depth > MAX_DEPTH {
        return Value::String("<nested too deeply>".into());
    }
    if let Ok(s) = obj.downcast_exact::<PyString>() {
        return Value::String(s.to_str().map(str::to_owned).unwrap_or_else(|_| s.to_string_lossy().into_owned()));
    }
    // Exact ints (block ids) before the subclass checks below: one type comparison (an
    // exact int is never a bool, so the result is the same).
    if obj.downcast_exact::<PyInt>().is_ok() {
        return int_value(obj);
    }
    if obj.is_instance_of::<PyBool>() {
        return Value::Bool(obj.is_truthy().unwrap_or(false));
    }
    if obj.is_instance_of::<PyInt>() {
        return int_value(obj);
    }
    if obj.is_instance_of::<PyFloat>() {
        return obj.extract::<f64>().ok().and_then(Number::from_f64).map(Value::Number).unwrap_or(Value::Null);
    }
    if let Ok(l) = obj.downcast_exact::<PyList>() {
        return Value::Array(l.iter().map(|x| to_value(&x, depth + 1)).collect());
    }
    if obj.is_instance_of::<PyDict>() {
        if let Ok(d) = obj.downcast::<PyDict>() {
            let mut m = Map::with_capacity(d.len());
            for (k, v) in d.iter() {
                let key = match k.downcast_exact::<PyString>() {
                    Ok(s) => s.to_str().map(str::to_owned).unwrap_or_else(|_| s.to_string_lossy().into_owned()),
                    Err(_) => k
                        .str()
                        .map(|s| s.to_str().map(str::to_owned).unwrap_or_else(|_| s.to_string_lossy().into_owned()))
                        .unwrap_or_default(),
                };
                m.insert(key, to_value(&v, depth + 1));
            }
            return Value::Object(m);
        }
    }
    if obj.is_instance_of::<PyList>() {
        if let Ok(l) = obj.downcast::<PyList>() {
            return Value::Array(l.iter().map(|x| to_value(&x, depth + 1)).collect());
        }
    }
    if obj.is_instance_of::<PyTuple>() {
        if let Ok(t) = obj.downcast::<PyTuple>() {
            return Value::Array(t.iter().map(|x| to_value(&x, depth + 1)).collect());
        }
    }
    if obj.is_instance_of::<PyString>() {
        if let Ok(s) = obj.downcast::<PyString>() {
            return Value::String(s.to_str().map(str::to_owned).unwrap_or_else(|_| s.to_string_lossy().into_owned()));
        }
    }
    // Anything else as its str(), like json.dumps(default=str).
    obj.str()
        .map(|s| Value::String(s.to_str().map(str::to_owned).unwrap_or_else(|_| s.to_string_lossy().into_owned())))
        .unwrap_or(Value::Null)
}

/// An int (not a bool) as a JSON number.
fn int_value(obj: &Bound<'_, PyAny>) -> Value {
    if let Ok(i) = obj.extract::<i64>() {
        return Value::Number(i.into());
    }
    if let Ok(u) = obj.extract::<u64>() {
        return Value::Number(u.into());
    }
    // Past 64 bits: as Python's json would write it, a number the parser then refuses.
    obj.extract::<f64>().ok().and_then(Number::from_f64).map(Value::Number).unwrap_or(Value::Null)
}

/// `kv_transfer_params` as JSON text: a str is taken as JSON already, anything else
/// (normally the request's dict) is converted.
pub fn params_text(obj: Option<&Bound<'_, PyAny>>) -> Option<String> {
    let obj = obj?;
    if obj.is_none() {
        return None;
    }
    if let Ok(s) = obj.downcast::<PyString>() {
        return Some(s.to_str().map(str::to_owned).unwrap_or_else(|_| s.to_string_lossy().into_owned()));
    }
    Some(to_value(obj, 0).to_string())
}

/// The params keys as interned Python strings, indexed by [`Field`] (their hashes are
/// computed once; a dict lookup then compares pointers).
static KEYS: pyo3::sync::GILOnceCell<Vec<Py<PyString>>> = pyo3::sync::GILOnceCell::new();

fn keys(py: Python<'_>) -> &[Py<PyString>] {
    KEYS.get_or_init(py, || Field::ALL.iter().map(|f| PyString::intern(py, f.name()).unbind()).collect())
}

/// A request's `kv_transfer_params` (not None), decoded: a dict's known keys are read
/// straight from it, each value converted as [`params_text`] would (so the checks and
/// errors are those of the JSON path); a str is JSON text; anything else goes through
/// [`params_text`]'s conversion.
pub fn req_params(obj: &Bound<'_, PyAny>) -> ReqParams {
    if let Ok(d) = obj.downcast::<PyDict>() {
        let py = obj.py();
        let keys = keys(py);
        // Keys are str in any dict that came from JSON; a value of None reads as absent,
        // as JSON null does.
        return ReqParams::from_fields(|f| {
            let key = match keys.get(f as usize) {
                Some(k) => k.bind(py).clone(),
                None => PyString::new(py, f.name()),
            };
            d.get_item(key).ok().flatten().map(|v| to_value(&v, 1))
        });
    }
    match params_text(Some(obj)) {
        Some(text) => ReqParams::from_json(&text),
        None => ReqParams::from_json("null"),
    }
}

/// A JSON value as Python objects (dict, list, str, int, float, bool, None).
pub fn to_py(py: Python<'_>, v: &Value) -> PyResult<PyObject> {
    Ok(match v {
        Value::Null => py.None(),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any().unbind(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any().unbind()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any().unbind()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any().unbind()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any().unbind(),
        Value::Array(a) => {
            let items = a.iter().map(|x| to_py(py, x)).collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        Value::Object(m) => {
            let d = PyDict::new(py);
            for (k, x) in m {
                d.set_item(k, to_py(py, x)?)?;
            }
            d.into_any().unbind()
        }
    })
}

/// Any iterable of str as strings: a list or tuple directly, anything else (a set) by
/// iterating it.
pub fn strings(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if obj.downcast::<PyList>().is_ok() || obj.downcast::<PyTuple>().is_ok() {
        return obj.extract();
    }
    obj.try_iter()?.map(|x| x.and_then(|x| x.extract::<String>())).collect()
}
