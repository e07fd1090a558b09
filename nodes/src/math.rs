//! Arithmetic on ints and floats. Errors instead of overflow, NaN or infinity.

use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use std::sync::Arc;

const INT_OPS: &[&str] = &["add", "sub", "mul", "div", "mod", "min", "max", "pow"];
const FLOAT_OPS: &[&str] = &["add", "sub", "mul", "div", "mod", "min", "max", "pow"];

pub struct IntMath {
    spec: NodeSpec,
}

impl IntMath {
    fn new() -> IntMath {
        IntMath {
            spec: NodeSpec::new("math.int", 1)
                .category("math")
                .describe(
                    "Integer arithmetic `a op b`. `div` and `mod` round towards negative infinity \
                     (Python's // and %); overflow and division by zero are errors.",
                )
                .input(InputSpec::new("op", PortType::enum_of(INT_OPS)).default("add"))
                .input(InputSpec::new("a", PortType::Int))
                .input(InputSpec::new("b", PortType::Int))
                .output("result", PortType::Int, "a op b")
                .inline(),
        }
    }
}

pub fn int_op(op: &str, a: i64, b: i64) -> Result<i64, String> {
    let overflow = || format!("{a} {op} {b} overflows a 64-bit integer");
    let nonzero = || {
        if b == 0 {
            Err(format!("{a} {op} 0: division by zero"))
        } else {
            Ok(())
        }
    };
    match op {
        "add" => a.checked_add(b).ok_or_else(overflow),
        "sub" => a.checked_sub(b).ok_or_else(overflow),
        "mul" => a.checked_mul(b).ok_or_else(overflow),
        "div" => {
            nonzero()?;
            let q = a.checked_div(b).ok_or_else(overflow)?;
            Ok(if (a % b != 0) && ((a < 0) != (b < 0)) {
                q - 1
            } else {
                q
            })
        }
        "mod" => {
            nonzero()?;
            let r = a.checked_rem(b).ok_or_else(overflow)?;
            Ok(if r != 0 && ((r < 0) != (b < 0)) {
                r + b
            } else {
                r
            })
        }
        "min" => Ok(a.min(b)),
        "max" => Ok(a.max(b)),
        "pow" => {
            let e = u32::try_from(b)
                .map_err(|_| format!("{a} pow {b}: the exponent must be 0..=4294967295"))?;
            a.checked_pow(e).ok_or_else(overflow)
        }
        other => Err(format!("unknown operation `{other}`")),
    }
}

impl Node for IntMath {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let r = int_op(inputs.str("op")?, inputs.int("a")?, inputs.int("b")?)
            .map_err(NodeError::msg)?;
        Ok(Outputs::one("result", Value::Int(r)))
    }
}

pub struct FloatMath {
    spec: NodeSpec,
}

impl FloatMath {
    fn new() -> FloatMath {
        FloatMath {
            spec: NodeSpec::new("math.float", 1)
                .category("math")
                .describe("Floating-point arithmetic `a op b` (ints widen). A result that is not finite is an error.")
                .input(InputSpec::new("op", PortType::enum_of(FLOAT_OPS)).default("add"))
                .input(InputSpec::new("a", PortType::Float))
                .input(InputSpec::new("b", PortType::Float))
                .output("result", PortType::Float, "a op b")
                .inline(),
        }
    }
}

pub fn float_op(op: &str, a: f64, b: f64) -> Result<f64, String> {
    let r = match op {
        "add" => a + b,
        "sub" => a - b,
        "mul" => a * b,
        "div" if b == 0.0 => return Err(format!("{a} div 0: division by zero")),
        "div" => a / b,
        "mod" if b == 0.0 => return Err(format!("{a} mod 0: division by zero")),
        "mod" => a - b * (a / b).floor(),
        "min" => a.min(b),
        "max" => a.max(b),
        "pow" => a.powf(b),
        other => return Err(format!("unknown operation `{other}`")),
    };
    if r.is_finite() {
        Ok(r)
    } else {
        Err(format!("{a} {op} {b} is not a finite number"))
    }
}

impl Node for FloatMath {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let r = float_op(inputs.str("op")?, inputs.float("a")?, inputs.float("b")?)
            .map_err(NodeError::msg)?;
        Ok(Outputs::one("result", Value::Float(r)))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(IntMath::new()), Arc::new(FloatMath::new())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_division_floors_like_python() {
        assert_eq!(int_op("div", 7, 2), Ok(3));
        assert_eq!(int_op("div", -7, 2), Ok(-4));
        assert_eq!(int_op("mod", -7, 2), Ok(1));
        assert_eq!(int_op("mod", 7, -2), Ok(-1));
        assert!(int_op("div", 1, 0).is_err());
        assert!(int_op("div", i64::MIN, -1).is_err());
        assert!(int_op("add", i64::MAX, 1).is_err());
        assert!(int_op("pow", 2, -1).is_err());
        assert_eq!(int_op("pow", 3, 4), Ok(81));
    }

    #[test]
    fn float_results_are_finite() {
        assert_eq!(float_op("mod", -7.0, 2.0), Ok(1.0));
        assert!(float_op("div", 1.0, 0.0).is_err());
        assert!(float_op("pow", 10.0, 400.0).is_err());
        assert_eq!(float_op("mul", 1.5, 2.0), Ok(3.0));
    }
}
